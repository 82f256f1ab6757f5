# Installs the mnemo_dev component of a build into a scratch prefix, then
# configures, builds and runs the consumer project against that prefix only.
# Run by CTest (client_install_consumer) with -D MNEMO_BINARY_DIR, CONSUMER_SRC,
# WORK_DIR, GENERATOR, CXX.
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}\n${err}")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

run("install" ${CMAKE_COMMAND} --install ${MNEMO_BINARY_DIR} --prefix ${prefix} --component mnemo_dev)
run("configure consumer" ${CMAKE_COMMAND} -S ${CONSUMER_SRC} -B ${WORK_DIR}/build -G ${GENERATOR}
    -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
run("build consumer" ${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run("run consumer" ${WORK_DIR}/build/mnemo_consumer)
message(STATUS "consumer said:\n${run_output}")
if(NOT run_output MATCHES "mnemod\\.sock")
  message(FATAL_ERROR "consumer output lacks the default socket path")
endif()
