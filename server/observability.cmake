# deft_server_obs: server metrics (/metrics over cpp-httplib; never prometheus-cpp-pull's Exposer,
# whose civetweb threads cannot start in a process linking cuBLASLt) and bearer API keys.
# Included from the root CMakeLists.txt after add_subdirectory(proto).
find_package(prometheus-cpp CONFIG REQUIRED)
find_package(PkgConfig REQUIRED)
# Debian's cpp-httplib is a compiled library; its Cflags (OpenSSL/zlib/brotli support) change the
# class layout, so they must come from pkg-config with the library.
pkg_check_modules(DEFT_OBS_HTTPLIB REQUIRED IMPORTED_TARGET cpp-httplib)
pkg_check_modules(DEFT_OBS_GRPCPP REQUIRED IMPORTED_TARGET grpc++)

add_library(deft_server_obs STATIC ${PROJECT_SOURCE_DIR}/server/metrics.cc
                                   ${PROJECT_SOURCE_DIR}/server/auth.cc)
target_include_directories(deft_server_obs PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(deft_server_obs
  PUBLIC prometheus-cpp::core PkgConfig::DEFT_OBS_GRPCPP deft_engine absl::status absl::statusor
         absl::strings absl::flat_hash_map Threads::Threads
  PRIVATE PkgConfig::DEFT_OBS_HTTPLIB)
