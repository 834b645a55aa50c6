package testbed

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where iproute2 looks for named namespaces.
const netnsDir = "/run/netns"

// namePrefix starts every namespace this package creates; the pid that
// follows it tells a later run whether the owner is still alive.
const namePrefix = "amb-"

// readyTimeout bounds how long AddNode and AddPod wait for the kernel to
// finish bringing links up (carrier and link-local addresses are applied
// asynchronously by the linkwatch work queue).
const readyTimeout = 5 * time.Second

// sysctl is one /proc/sys/net setting; optional ones may be missing (for
// example the bridge-nf knobs exist only when br_netfilter is loaded).
type sysctl struct {
	key, value string
	optional   bool
}

// netNS is one named network namespace created by the bed.
type netNS struct {
	name string
	path string
	id   nsID
	nl   *netlink.Handle // netlink socket living inside the namespace
	fd   netns.NsHandle  // for IFLA_NET_NS_FD when a veth peer is placed here
}

// nsID identifies a namespace by its nsfs inode, which stays valid after
// the /run/netns mount is gone.
type nsID struct{ dev, ino uint64 }

// statNS returns the id of the namespace bound at path, and false if path
// is not a namespace mount (a stale plain file must never match a process).
func statNS(path string) (nsID, bool) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil || fs.Type != unix.NSFS_MAGIC {
		return nsID{}, false
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nsID{}, false
	}
	return nsID{dev: st.Dev, ino: st.Ino}, true
}

var (
	netnsDirOnce sync.Once
	netnsDirErr  error
)

// prepareNetnsDir makes /run/netns a shared mount point, as "ip netns add"
// does, so that unmounting a namespace here also unmounts the copies that
// mount namespaces created in the meantime (ip netns exec, containers) hold;
// otherwise those copies keep the namespace alive after Close.
func prepareNetnsDir() error {
	netnsDirOnce.Do(func() {
		if err := os.MkdirAll(netnsDir, 0o755); err != nil {
			netnsDirErr = err
			return
		}
		err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if errors.Is(err, unix.EINVAL) { // not a mount point yet
			if err = unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err == nil {
				err = unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
			}
		}
		if err != nil {
			netnsDirErr = fmt.Errorf("make %s a shared mount: %w", netnsDir, err)
		}
	})
	return netnsDirErr
}

// createNS creates a network namespace bound to /run/netns/name, applies
// settings before any interface exists (per-interface defaults such as
// accept_dad are copied from "default" when an interface is created) and
// brings lo up.
func createNS(name string, settings []sysctl) (*netNS, error) {
	if err := prepareNetnsDir(); err != nil {
		return nil, err
	}
	path := filepath.Join(netnsDir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	f.Close()

	type result struct {
		h   *netlink.Handle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Switch back rather than let the goroutine exit locked: the runtime
		// destroys a locked thread on exit, except the main thread, which
		// it parks forever instead, keeping its namespace (and every
		// interface in it) alive until the process exits.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("open current netns: %w", err)}
			return
		}
		defer orig.Close()
		h, err := unshareNS(path, settings)
		if e := netns.Set(orig); e != nil {
			// Stay locked so no other goroutine runs in the new namespace.
			if h != nil {
				h.Close()
			}
			ch <- result{err: errors.Join(err, fmt.Errorf("leave new netns: %w", e))}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{h, err}
	}()
	r := <-ch
	if r.err != nil {
		return nil, errors.Join(fmt.Errorf("create netns %s: %w", name, r.err), unmountNS(path))
	}
	fd, err := netns.GetFromPath(path)
	if err != nil {
		r.h.Close()
		return nil, errors.Join(fmt.Errorf("open netns %s: %w", name, err), unmountNS(path))
	}
	id, ok := statNS(path)
	if !ok {
		r.h.Close()
		fd.Close()
		return nil, errors.Join(fmt.Errorf("create netns %s: not an nsfs mount", name), unmountNS(path))
	}
	return &netNS{name: name, path: path, id: id, nl: r.h, fd: fd}, nil
}

// unshareNS moves the calling (locked) thread into a new namespace.
func unshareNS(path string, settings []sysctl) (*netlink.Handle, error) {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("unshare: %w", err)
	}
	self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
	if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
		return nil, fmt.Errorf("bind mount: %w", err)
	}
	if err := writeSysctls(settings); err != nil {
		return nil, err
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("set lo up: %w", err)
	}
	return h, nil
}

// writeSysctls must run on a thread inside the target namespace: the kernel
// resolves /proc/sys/net against the calling thread's namespace.
func writeSysctls(settings []sysctl) error {
	for _, s := range settings {
		err := os.WriteFile(filepath.Join("/proc/sys", s.key), []byte(s.value), 0)
		if err != nil && !(s.optional && errors.Is(err, os.ErrNotExist)) {
			return fmt.Errorf("sysctl %s=%s: %w", s.key, s.value, err)
		}
	}
	return nil
}

// errFnExited reports that fn called runtime.Goexit (t.FailNow, t.SkipNow).
var errFnExited = errors.New("function called runtime.Goexit (FailNow/SkipNow must be called from the test goroutine)")

// do runs fn on a dedicated goroutine locked to an OS thread inside the
// namespace. A dedicated goroutine keeps the caller's own thread untouched:
// if switching back fails, that goroutine exits still locked and the runtime
// never reuses its thread. A panic in fn is re-raised in the caller.
func (ns *netNS) do(fn func() error) error {
	var (
		done     = make(chan struct{})
		err      error
		returned bool
		panicked bool
		pval     any
	)
	go func() {
		defer close(done)
		runtime.LockOSThread()
		target, e := netns.GetFromPath(ns.path)
		if e != nil {
			runtime.UnlockOSThread()
			err = fmt.Errorf("open netns %s: %w", ns.name, e)
			returned = true
			return
		}
		defer target.Close()
		orig, e := netns.Get()
		if e != nil {
			runtime.UnlockOSThread()
			err = fmt.Errorf("open current netns: %w", e)
			returned = true
			return
		}
		defer orig.Close()
		if e := netns.Set(target); e != nil {
			// setns failed, so the thread is still where it was.
			runtime.UnlockOSThread()
			err = fmt.Errorf("enter netns %s: %w", ns.name, e)
			returned = true
			return
		}
		defer func() {
			if e := netns.Set(orig); e != nil {
				err = errors.Join(err, fmt.Errorf("leave netns %s: %w", ns.name, e))
				return // stay locked: the runtime never reuses the thread
			}
			runtime.UnlockOSThread()
		}()
		defer func() {
			if !returned {
				if pval = recover(); pval != nil {
					panicked = true
				}
			}
		}()
		err = fn()
		returned = true
	}()
	<-done
	if panicked {
		panic(pval)
	}
	if !returned {
		return errors.Join(errFnExited, err)
	}
	return err
}

// destroy unmounts the namespace and kills the processes using it. The
// kernel frees the namespace, and every interface in it, once the last
// reference (mount, process, open file or socket) is gone.
func (ns *netNS) destroy() error {
	ns.nl.Close()
	var errs []error
	if err := ns.fd.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close netns %s: %w", ns.name, err))
	}
	errs = append(errs, unmountNS(ns.path), killProcs(ns.id))
	return errors.Join(errs...)
}

// unmountNS removes the bind mount and the file under /run/netns.
func unmountNS(path string) error {
	var errs []error
	// MNT_DETACH: a process may still have the file open (nsenter starting).
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount %s: %w", path, err))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// killProcs sends SIGKILL to every other process that is in the namespace
// or holds it open. Callers unmount first: from then on nothing can open
// the namespace anew, and a process caught between opening it and setns
// (nsenter just started by Command) still holds the fd, so checking fds
// before membership cannot miss it.
func killProcs(id nsID) error {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("kill processes in netns: %w", err)
	}
	self := os.Getpid()
	link := fmt.Sprintf("net:[%d]", id.ino)
	var errs []error
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		dir := "/proc/" + e.Name()
		if !holdsNS(dir, link, id) && !sameNS(dir+"/ns/net", id) {
			continue
		}
		if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("kill pid %d in netns: %w", pid, err))
		}
	}
	return errors.Join(errs...)
}

func sameNS(path string, id nsID) bool {
	var st unix.Stat_t
	return unix.Stat(path, &st) == nil && st.Dev == id.dev && st.Ino == id.ino
}

// holdsNS reports whether the process in dir has the namespace open.
func holdsNS(dir, link string, id nsID) bool {
	fds, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return false // exited meanwhile, or a kernel thread
	}
	for _, fd := range fds {
		p := dir + "/fd/" + fd.Name()
		if target, err := os.Readlink(p); err == nil && target == link && sameNS(p, id) {
			return true
		}
	}
	return false
}

// sweepStale removes namespaces left by earlier runs of this package whose
// process is gone (a crash, SIGKILL, os.Exit). Namespaces of live processes,
// including other test binaries running in parallel, are left alone.
func sweepStale() error {
	entries, err := os.ReadDir(netnsDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("sweep %s: %w", netnsDir, err)
	}
	var errs []error
	for _, e := range entries {
		pid, ok := ownerPID(e.Name())
		if !ok || pid == os.Getpid() || processAlive(pid) {
			continue
		}
		path := filepath.Join(netnsDir, e.Name())
		id, isNS := statNS(path)
		errs = append(errs, unmountNS(path))
		if isNS {
			errs = append(errs, killProcs(id))
		}
	}
	return errors.Join(errs...)
}

// ownerPID parses amb-<pid>-<seq>-<role>.
func ownerPID(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, namePrefix)
	if !ok {
		return 0, false
	}
	fields := strings.SplitN(rest, "-", 3)
	if len(fields) != 3 {
		return 0, false
	}
	pid, err := strconv.Atoi(fields[0])
	if err != nil || pid <= 0 {
		return 0, false
	}
	if _, err := strconv.ParseUint(fields[1], 10, 64); err != nil {
		return 0, false
	}
	return pid, true
}

func processAlive(pid int) bool {
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// waitLink waits until the link is operationally up and, if linkLocal is
// set, has a usable IPv6 link-local address: NDP needs one on both ends
// of a veth, and the kernel adds it only once linkwatch has seen carrier.
func waitLink(h *netlink.Handle, name string, linkLocal bool) error {
	deadline := time.Now().Add(readyTimeout)
	for {
		link, err := h.LinkByName(name)
		if errors.Is(err, netlink.ErrDumpInterrupted) {
			// The kernel's link table changed during the dump (many veths
			// coming and going on a busy node): ask again.
			if time.Now().After(deadline) {
				return fmt.Errorf("wait for %s: %w", name, err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("wait for %s: %w", name, err)
		}
		up := link.Attrs().OperState == netlink.OperUp
		if up && linkLocal {
			up = false
			addrs, err := h.AddrList(link, netlink.FAMILY_V6)
			if errors.Is(err, netlink.ErrDumpInterrupted) && time.Now().Before(deadline) {
				continue
			}
			if err != nil {
				return fmt.Errorf("wait for %s: %w", name, err)
			}
			for _, a := range addrs {
				if a.IP.IsLinkLocalUnicast() && a.Flags&unix.IFA_F_TENTATIVE == 0 {
					up = true
				}
			}
		}
		if up {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for %s: not ready after %v (oper state %v)", name, readyTimeout, link.Attrs().OperState)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
