// The shipped Linux x64 binary loads on glibc 2.28 and later (Node 20's own floor), whatever
// glibc and GCC built it. Linked only into the cmake-js build (CMakeLists.txt,
// ADAFISHER_PORTABLE_LINUX), together with -static-libstdc++ and one -Wl,--wrap=NAME per name
// below.
//
// NOTE: [portable binary]
// A shared object asks for the newest version of each glibc symbol it links against:
// built on glibc 2.34+, pthread_create, dlopen, sem_wait, shm_open ... come out as
// GLIBC_2.34 (the release that moved libpthread, libdl and librt into libc), pow as
// GLIBC_2.29, and libstdc++'s inline code reads __libc_single_threaded (GLIBC_2.32). The
// dynamic loader of an older glibc then refuses the whole binary ("version `GLIBC_2.34' not
// found"), and node-gyp-build falls back to compiling a CPU-only addon from source: no
// CUDA, and a compiler needed, on exactly the systems GPU clusters run (RHEL/Rocky 8,
// Ubuntu 20.04). The build machine's libstdc++ (GLIBCXX_3.4.30, GCC 12) would likewise be
// refused where the system's is GCC 11's (RHEL 9, Amazon Linux 2023).
//
// So: libstdc++ is linked statically (its symbols kept local by --exclude-libs; libgcc_s
// stays shared, its symbol versions are GCC 3/4's), and every reference to a symbol below,
// in our objects, the static CUDA runtime and the static libstdc++ alike, is renamed by
// --wrap to __wrap_NAME: for most, a one-instruction jump to the oldest version of NAME,
// which every glibc since 2.2.5 (x86-64's first) exports. It is the same function (in glibc
// 2.34+ the old versions are aliases of the new), so behaviour and results are unchanged. On
// glibc < 2.34 those versions live in libpthread, libdl and librt, which the binary names
// as needed libraries (CMakeLists.txt). __libc_single_threaded becomes a constant 0 ("maybe
// several threads"): libstdc++ then always takes its atomic paths, as it did before glibc
// 2.32. arc4random (glibc 2.36, reached only through std::random_device, which this addon
// never constructs; libstdc++ links it in anyway) is getrandom(2).
//
// test/portable-binary.test.ts reads the built binary's ELF version needs and fails on any
// GLIBC version above 2.28 and on any GLIBCXX or CXXABI need, naming the symbols, so that a
// new dependency of a later change is caught here rather than in a user's failed install.
#include <features.h>  // __GLIBC__
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>

#if !defined(__linux__) || !defined(__x86_64__) || !defined(__GLIBC__)
#error "glibc_compat.cc is for the glibc x86-64 build (ADAFISHER_PORTABLE_LINUX)"
#endif

// __wrap_NAME: jmp to NAME@VERSION through the PLT (a tail call: arguments and return
// value pass through untouched, whatever NAME's signature).
#define ADAFISHER_COMPAT(name, version)                       \
  __asm__(".globl __wrap_" #name "\n"                         \
          ".hidden __wrap_" #name "\n"                        \
          ".type __wrap_" #name ", @function\n"               \
          "__wrap_" #name ":\n"                               \
          "  jmp adafisher_compat_" #name "@PLT\n"            \
          ".size __wrap_" #name ", . - __wrap_" #name "\n"    \
          ".symver adafisher_compat_" #name ", " #name "@" version "\n");

__asm__(".text\n");
// libm: GLIBC_2.29 dropped pow's SVID error wrapper; the value is the same.
ADAFISHER_COMPAT(pow, "GLIBC_2.2.5")
// libdl before 2.34.
ADAFISHER_COMPAT(dlclose, "GLIBC_2.2.5")
ADAFISHER_COMPAT(dlerror, "GLIBC_2.2.5")
ADAFISHER_COMPAT(dlmopen, "GLIBC_2.3.4")
ADAFISHER_COMPAT(dlopen, "GLIBC_2.2.5")
ADAFISHER_COMPAT(dlsym, "GLIBC_2.2.5")
ADAFISHER_COMPAT(dlvsym, "GLIBC_2.2.5")
// libpthread before 2.34.
ADAFISHER_COMPAT(pthread_condattr_setpshared, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_create, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_detach, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_getspecific, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_join, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_key_create, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_key_delete, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_kill, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_mutex_trylock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_mutexattr_destroy, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_mutexattr_init, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_mutexattr_setpshared, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_mutexattr_settype, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_once, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_destroy, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_init, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_rdlock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_timedrdlock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_timedwrlock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_tryrdlock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_trywrlock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_unlock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlock_wrlock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlockattr_destroy, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlockattr_init, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_rwlockattr_setpshared, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_setspecific, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_spin_destroy, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_spin_init, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_spin_lock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_spin_trylock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(pthread_spin_unlock, "GLIBC_2.2.5")
ADAFISHER_COMPAT(sem_destroy, "GLIBC_2.2.5")
ADAFISHER_COMPAT(sem_init, "GLIBC_2.2.5")
ADAFISHER_COMPAT(sem_post, "GLIBC_2.2.5")
ADAFISHER_COMPAT(sem_timedwait, "GLIBC_2.2.5")
ADAFISHER_COMPAT(sem_trywait, "GLIBC_2.2.5")
ADAFISHER_COMPAT(sem_wait, "GLIBC_2.2.5")
// librt before 2.34.
ADAFISHER_COMPAT(shm_open, "GLIBC_2.2.5")
ADAFISHER_COMPAT(shm_unlink, "GLIBC_2.2.5")

// glibc 2.32+'s "this process has one thread" flag, read by libstdc++'s inline code.
extern "C" {
__attribute__((visibility("hidden"))) char __wrap___libc_single_threaded = 0;
}

// glibc 2.36's arc4random: 4 bytes of getrandom(2) (Linux 3.17+), retried when interrupted.
// Where the kernel has no getrandom, the time stamp counter mixed by a fixed hash; nothing
// here draws random numbers, so that path only has to return.
extern "C" __attribute__((visibility("hidden"))) uint32_t __wrap_arc4random(void) {
  uint32_t value = 0;
  for (;;) {
    const long got = syscall(SYS_getrandom, &value, sizeof value, 0);
    if (got == static_cast<long>(sizeof value)) return value;
    if (got < 0 && errno != EINTR) break;
  }
  uint64_t z = __builtin_ia32_rdtsc() + 0x9e3779b97f4a7c15ull;  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}
