/* LD_PRELOAD shim for a CernVM-FS client under test (tests/cvmfs/client.py).
 *
 * CernVM-FS >= 2.11 sets CVMFS_ARCH in its own environment from uname(2)'s machine, overwriting
 * any value from the client config or the caller (2.12: FileSystem::SetupGlobalEnvironmentParams),
 * and expands variant symlinks with getenv (SqlDirent::ExpandSymlink). On one x86_64 test machine
 * the shim lets a real client see another node's view:
 *   ARCHSHIM_MACHINE=aarch64   uname(2) reports that machine (an arm64 node's client);
 *   ARCHSHIM_NO_CVMFS_ARCH=1   the client's setenv("CVMFS_ARCH", ...) is skipped (a client
 *                              before 2.11, where the variable is unset).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
int uname(struct utsname *buf) {
  int (*real)(struct utsname *) = (int (*)(struct utsname *))dlsym(RTLD_NEXT, "uname");
  int r = real(buf);
  const char *m = getenv("ARCHSHIM_MACHINE");
  if (r == 0 && m && *m) { strncpy(buf->machine, m, sizeof(buf->machine) - 1); buf->machine[sizeof(buf->machine) - 1] = 0; }
  return r;
}
int setenv(const char *name, const char *value, int overwrite) {
  int (*real)(const char *, const char *, int) = (int (*)(const char *, const char *, int))dlsym(RTLD_NEXT, "setenv");
  if (getenv("ARCHSHIM_NO_CVMFS_ARCH") && strcmp(name, "CVMFS_ARCH") == 0) return 0;
  return real(name, value, overwrite);
}
