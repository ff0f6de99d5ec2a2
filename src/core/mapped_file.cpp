#include "core/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "moxin/errors.h"

namespace moxin {

namespace {

[[noreturn]] void throw_os_error(const std::string& what, const std::string& path, int error) {
  throw_error(ErrorKind::Io, what + " " + path + ": " + std::strerror(error));
}

// Closes the descriptor on every path out of open(), including the throwing ones.
struct FileDescriptor {
  int fd = -1;
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::shared_ptr<const MappedFile> MappedFile::open(const std::filesystem::path& path) {
  const std::string name = path.string();
  FileDescriptor file;
  do {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    file.fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  } while (file.fd < 0 && errno == EINTR);
  if (file.fd < 0) throw_os_error("cannot open", name, errno);

  struct stat info {};
  if (::fstat(file.fd, &info) != 0) throw_os_error("cannot stat", name, errno);
  // open() succeeds on directories and devices; only a regular file has a size to map.
  if (S_ISDIR(info.st_mode)) throw_os_error("cannot map", name, EISDIR);
  if (!S_ISREG(info.st_mode))
    throw_error(ErrorKind::Io, "cannot map " + name + ": not a regular file");

  const size_t size = size_t(info.st_size);
  // mmap refuses a length of zero; an empty file is simply an empty byte range.
  if (size == 0) return std::shared_ptr<const MappedFile>(new MappedFile(name, nullptr, 0));

  void* address = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, file.fd, 0);
  if (address == MAP_FAILED) throw_os_error("cannot map", name, errno);
  return std::shared_ptr<const MappedFile>(
      new MappedFile(name, static_cast<const uint8_t*>(address), size));
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

}  // namespace moxin
