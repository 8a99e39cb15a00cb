# The CUDA host emulator (README.md here): adafisher_use_cuda_emulator(<target> <.cu files>)
# compiles the given CUDA sources as C++ into <target>, with the emulator's cuda_runtime.h
# and runtime. Each launch `K<<<config>>>(args)` is rewritten into
# `::cuda_emu::Launch("K", K, config)(args)`; nothing else in the source changes, and
# #line keeps diagnostics pointing at cuda/*.cu.
set(ADAFISHER_CUDA_EMULATOR_DIR ${CMAKE_CURRENT_LIST_DIR})

function(adafisher_use_cuda_emulator target)
  set(out_dir ${CMAKE_CURRENT_BINARY_DIR}/cuda-emulator-src)
  foreach(cu ${ARGN})
    file(READ ${cu} text)
    string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_]*(<[^<>;]*>)?)<<<(([^>]|>[^>])*)>>>"
           "::cuda_emu::Launch(\"\\1\", \\1, \\3)" text "${text}")
    get_filename_component(name ${cu} NAME_WE)
    get_filename_component(dir ${cu} DIRECTORY)
    set(out ${out_dir}/${name}.cc)
    file(WRITE ${out}.tmp "#line 1 \"${cu}\"\n${text}")
    file(COPY_FILE ${out}.tmp ${out} ONLY_IF_DIFFERENT)
    set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${cu})
    target_sources(${target} PRIVATE ${out})
    target_include_directories(${target} PRIVATE ${dir})
  endforeach()
  target_sources(${target} PRIVATE ${ADAFISHER_CUDA_EMULATOR_DIR}/cuda_emulator.cc)
  target_include_directories(${target} BEFORE PRIVATE ${ADAFISHER_CUDA_EMULATOR_DIR}/include)
  target_compile_definitions(${target} PRIVATE ADAFISHER_CUDA_EMULATOR=1)
endfunction()

# The emulator's own self-test (self_test.cc): what it computes and what it catches.
function(adafisher_add_cuda_emulator_self_test target)
  add_executable(${target} ${ADAFISHER_CUDA_EMULATOR_DIR}/self_test.cc ${ADAFISHER_CUDA_EMULATOR_DIR}/cuda_emulator.cc)
  target_include_directories(${target} BEFORE PRIVATE ${ADAFISHER_CUDA_EMULATOR_DIR}/include)
endfunction()
