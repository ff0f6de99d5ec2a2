# The CUDA backend (src/backend/cuda/*.cu). On by default when a CUDA compiler is found; with
# -DMOXIN_CUDA=OFF, or without nvcc, the library builds CPU-only and `--device cuda` answers
# with a clear error. The runtime is linked statically (cudart_static) so the binary runs on a
# machine with only the driver; cuBLASLt is the toolkit's shared library.
include(CheckLanguage)
check_language(CUDA)
set(_moxin_cuda_default OFF)
if(CMAKE_CUDA_COMPILER)
  set(_moxin_cuda_default ON)
endif()
option(MOXIN_CUDA "Build the CUDA backend (needs the CUDA 13 toolkit)" ${_moxin_cuda_default})

if(MOXIN_CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR "MOXIN_CUDA=ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER)")
  endif()
  # Ampere (sm_80) and Hopper with its architecture-specific instructions (sm_90a).
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80-real 90a-real)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit 13 REQUIRED)
  if(CUDAToolkit_VERSION VERSION_LESS 13)
    message(FATAL_ERROR "the CUDA backend needs CUDA 13, found ${CUDAToolkit_VERSION}")
  endif()

  # The moxin target is created after this file is included, so the sources are attached
  # once the top-level CMakeLists.txt has been processed.
  function(moxin_attach_cuda)
    file(GLOB _moxin_cuda_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/backend/cuda/*.cu)
    target_sources(moxin PRIVATE ${_moxin_cuda_sources})
    # Public: tests and tools compile their GPU-only parts under the same switch.
    target_compile_definitions(moxin PUBLIC MOXIN_WITH_CUDA=1)
    # This CMake does not know nvcc 13's C++20 flag: CUDA sources get -std=c++20 directly.
    set_target_properties(moxin PROPERTIES CUDA_STANDARD_REQUIRED OFF)
    target_compile_options(moxin PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr -lineinfo>)
    set_target_properties(moxin PROPERTIES CUDA_SEPARABLE_COMPILATION OFF
                                           CUDA_RUNTIME_LIBRARY Static)
    target_link_libraries(moxin PUBLIC CUDA::cudart_static CUDA::cublasLt)
  endfunction()
  cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL moxin_attach_cuda)
  message(STATUS "moxin: CUDA backend ON (${CMAKE_CUDA_COMPILER_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "moxin: CUDA backend OFF")
endif()
