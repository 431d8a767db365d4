#!/bin/sh
# A site runner for `casfs --sandbox-wrapper`, as a site could write one with util-linux
# alone: new mount, PID, IPC, UTS (and network) namespaces, the host folders bound
# read-only, /proc, a sized /tmp and /dev, a chroot into the root, then the unprivileged
# user with no capabilities and no_new_privs. The sandbox tests run every hostile action
# through it too; the CASFS_SANDBOX_* variables are casfs's (see the README).
set -eu
net=--net
[ "$CASFS_SANDBOX_NETWORK" = 1 ] && net=
# shellcheck disable=SC2016
exec /usr/bin/unshare --mount --propagation private --pid --fork --kill-child --ipc --uts $net -- /bin/sh -eu -c '
r=$CASFS_SANDBOX_ROOT
old_ifs=$IFS
IFS=:
for d in $CASFS_SANDBOX_HOST_DIRS; do
    /usr/bin/mount --rbind "$d" "$r$d"
    /usr/bin/mount -o remount,bind,ro,nosuid,nodev "$r$d"
done
IFS=$old_ifs
/usr/bin/mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
/usr/bin/mount -t tmpfs -o "size=$CASFS_SANDBOX_TMP_SIZE,mode=1777,nosuid,nodev" tmpfs "$r/tmp"
/usr/bin/mount -t tmpfs -o mode=0755,nosuid,noexec tmpfs "$r/dev"
for n in null zero full random urandom; do
    : > "$r/dev/$n"
    /usr/bin/mount --bind "/dev/$n" "$r/dev/$n"
done
cwd=$CASFS_SANDBOX_CWD uid=$CASFS_SANDBOX_UID gid=$CASFS_SANDBOX_GID
unset CASFS_SANDBOX_ROOT CASFS_SANDBOX_CWD CASFS_SANDBOX_UID CASFS_SANDBOX_GID CASFS_SANDBOX_RUN_AS_ROOT \
    CASFS_SANDBOX_NETWORK CASFS_SANDBOX_TMP_SIZE CASFS_SANDBOX_HOST_DIRS
exec /usr/sbin/chroot "$r" /usr/bin/setpriv --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all \
    --bounding-set=-all --no-new-privs -- /bin/sh -c "cd \"\$0\" && exec \"\$@\"" "$cwd" "$@"
' site-runner "$@"
