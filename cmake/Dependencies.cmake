# Third-party libraries. Image codecs and BLAS are linked statically so the binary runs on
# machines that lack (or ship other sonames of) them, such as the GPU machine.
find_package(OpenMP REQUIRED COMPONENTS CXX)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(CLI11 REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)

# OpenBLAS, OpenMP flavour: a BLAS call made inside one of our parallel regions then runs on
# the calling thread instead of oversubscribing the cores with a second thread pool.
find_library(OPENBLAS_LIBRARY NAMES libopenblas.a openblas
             HINTS /usr/lib/x86_64-linux-gnu/openblas-openmp REQUIRED NO_DEFAULT_PATH)
find_path(OPENBLAS_INCLUDE_DIR cblas.h HINTS /usr/include/x86_64-linux-gnu/openblas-openmp
          /usr/include/openblas REQUIRED)
find_library(JPEG_STATIC NAMES libjpeg.a REQUIRED)
find_library(PNG_STATIC NAMES libpng16.a libpng.a REQUIRED)
find_library(WEBP_STATIC NAMES libwebp.a REQUIRED)
find_library(SHARPYUV_STATIC NAMES libsharpyuv.a)
find_package(ZLIB REQUIRED)

add_library(moxin_deps INTERFACE)
target_include_directories(moxin_deps INTERFACE ${OPENBLAS_INCLUDE_DIR})
target_link_libraries(moxin_deps INTERFACE
  nlohmann_json::nlohmann_json
  PkgConfig::SENTENCEPIECE
  ${OPENBLAS_LIBRARY}
  ${PNG_STATIC} ZLIB::ZLIB ${JPEG_STATIC} ${WEBP_STATIC}
  OpenMP::OpenMP_CXX
  m pthread)
if(SHARPYUV_STATIC)
  target_link_libraries(moxin_deps INTERFACE ${SHARPYUV_STATIC})
endif()
# libopenblas.a carries LAPACK compiled from Fortran; the objects we use do not need it,
# but gfortran's runtime resolves the rest if the linker asks.
find_library(GFORTRAN_LIBRARY NAMES gfortran libgfortran.so.5)
if(GFORTRAN_LIBRARY)
  target_link_libraries(moxin_deps INTERFACE ${GFORTRAN_LIBRARY})
endif()
