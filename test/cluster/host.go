package cluster

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// hostRecord is what Up changes outside the state directory, written
// before the change so that Down can undo the changes of an Up that
// crashed half way.
type hostRecord struct {
	// Sysctls maps /proc/sys paths to their values before Up.
	Sysctls map[string]string `json:"sysctls"`
	// Created are host paths that did not exist before Up.
	Created []string `json:"created"`
	// NetnsMount is set when /run/netns was not a mount point before Up:
	// Up makes it a shared bind mount of itself (what `ip netns add`
	// does), so that pod network namespaces created after a container
	// started propagate into it (the CNI-chaining DaemonSet mounts it
	// with HostToContainer; containerd refuses that on a private mount).
	NetnsMount bool `json:"netns_mount"`
}

const netnsDir = "/run/netns"

// savedSysctls are the host settings the node changes: the kubelet sets
// the first three (its "kernel defaults"), the ptp CNI plugin turns on
// forwarding.
var savedSysctls = []string{
	"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops",
	"net/ipv4/ip_forward",
}

// hostPaths are places the kubelet, containerd and libcni write no matter
// where their roots are: the device-plugin socket dir, the container log
// symlinks, libcni's result cache, containerd's shim sockets, pod netns
// mounts.
var hostPaths = []string{
	"/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/var/lib/cni",
	"/run/containerd", "/run/netns", "/etc/cni", "/opt/cni",
}

// prepareHost records the host's state (unless a record from an earlier,
// unfinished Up exists: that one holds the original values), then creates
// the node's interface, its routes and the traffic guard.
func prepareHost(l layout) error {
	if _, err := os.Stat(l.hostRecord()); errors.Is(err, fs.ErrNotExist) {
		rec := hostRecord{Sysctls: map[string]string{}}
		for _, s := range savedSysctls {
			b, err := os.ReadFile("/proc/sys/" + s)
			if err != nil {
				return fmt.Errorf("prepare host: %w", err)
			}
			rec.Sysctls[s] = strings.TrimSpace(string(b))
		}
		for _, p := range hostPaths {
			if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
				rec.Created = append(rec.Created, p)
			}
		}
		rec.NetnsMount = !slices.Contains(mountsUnder(netnsDir), netnsDir)
		b, _ := json.MarshalIndent(rec, "", "  ")
		if err := os.WriteFile(l.hostRecord(), b, 0o644); err != nil {
			return fmt.Errorf("prepare host: %w", err)
		}
	}

	if !slices.Contains(mountsUnder(netnsDir), netnsDir) {
		if err := os.MkdirAll(netnsDir, 0o755); err != nil {
			return fmt.Errorf("prepare host: %w", err)
		}
		if err := syscall.Mount(netnsDir, netnsDir, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("prepare host: bind mount %s: %w", netnsDir, err)
		}
		if err := syscall.Mount("", netnsDir, "", syscall.MS_SHARED, ""); err != nil {
			return fmt.Errorf("prepare host: make %s shared: %w", netnsDir, err)
		}
	}

	link, err := netlink.LinkByName(NodeLink)
	if err != nil {
		// A veth pair with both ends on the host: this kernel has no dummy
		// driver, and an address needs an interface that is up.
		link = &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: NodeLink}, PeerName: nodePeer}
		if err := netlink.LinkAdd(link); err != nil {
			return fmt.Errorf("prepare host: add %s: %w", NodeLink, err)
		}
		if peer, err := netlink.LinkByName(nodePeer); err == nil {
			_ = netlink.LinkSetUp(peer)
		}
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(NodeIP), Mask: net.CIDRMask(32, 32)}}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("prepare host: address %s: %w", NodeIP, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("prepare host: up %s: %w", NodeLink, err)
	}
	// Service IPs route to the node's interface: the host's own sockets
	// (hostNetwork pods, the ztunnel dialling istiod) need a route before
	// kube-proxy's output-hook DNAT can translate them. What kube-proxy
	// does not translate comes back in on the veth's peer, where the guard
	// drops it: it never follows the default route off the machine.
	if err := netlink.RouteReplace(serviceRoute(link)); err != nil {
		return fmt.Errorf("prepare host: route %s: %w", ServiceCIDR, err)
	}
	// Pods may talk to each other, to Services and to the node, never
	// beyond: no packet from a pod is forwarded out of 198.18.0.0/15.
	guard := fmt.Sprintf(`table inet %[1]s
delete table inet %[1]s
table inet %[1]s {
	chain forward {
		type filter hook forward priority filter; policy accept;
		ip saddr %[2]s ip daddr != 198.18.0.0/15 counter drop
	}
	chain untranslated {
		type filter hook prerouting priority raw; policy accept;
		iifname %[3]q ip daddr %[4]s counter drop
	}
}
`, guardTable, PodCIDR, nodePeer, ServiceCIDR)
	if err := nft(guard); err != nil {
		return fmt.Errorf("prepare host: traffic guard: %w", err)
	}
	return nil
}

func serviceRoute(link netlink.Link) *netlink.Route {
	_, dst, _ := net.ParseCIDR(ServiceCIDR)
	return &netlink.Route{Dst: dst, LinkIndex: link.Attrs().Index, Scope: netlink.SCOPE_LINK}
}

func nft(script string) error {
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft: %w: %s", err, strings.TrimSpace(string(b)))
	}
	return nil
}

// nftTables are the tables the node adds: kube-proxy's (nftables mode)
// and the guard.
var nftTables = []string{"ip kube-proxy", "ip6 kube-proxy", "inet " + guardTable}

// restoreHost removes what prepareHost and the node added to the host
// network and restores the recorded sysctls and paths. It works from
// whatever is there: every step is skipped when its object is gone.
func restoreHost(l layout) error {
	var errs []error
	for _, t := range nftTables {
		if out, err := exec.Command("nft", "list", "table", strings.Fields(t)[0], strings.Fields(t)[1]).CombinedOutput(); err == nil {
			if err := nft("delete table " + t + "\n"); err != nil {
				errs = append(errs, err)
			}
		} else if !strings.Contains(string(out), "No such file") {
			errs = append(errs, fmt.Errorf("nft list table %s: %s", t, strings.TrimSpace(string(out))))
		}
	}
	// Host-side veths of pods whose netns outlived the runtime: ptp puts
	// the gateway address on each.
	links, _ := netlink.LinkList()
	for _, link := range links {
		if link.Type() != "veth" || !strings.HasPrefix(link.Attrs().Name, "veth") {
			continue
		}
		addrs, _ := netlink.AddrList(link, netlink.FAMILY_V4)
		if slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IP.String() == ptpGateway }) {
			if err := netlink.LinkDel(link); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", link.Attrs().Name, err))
			}
		}
	}
	// The Service route goes with the node's interface.
	if link, err := netlink.LinkByName(NodeLink); err == nil {
		if err := netlink.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", NodeLink, err))
		}
	}

	b, err := os.ReadFile(l.hostRecord())
	if errors.Is(err, fs.ErrNotExist) {
		return errors.Join(errs...)
	}
	var rec hostRecord
	if err == nil {
		err = json.Unmarshal(b, &rec)
	}
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("read host record: %w", err))...)
	}
	for s, v := range rec.Sysctls {
		if err := os.WriteFile("/proc/sys/"+s, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", s, err))
		}
	}
	// libcni's cache entries of our network, also when /var/lib/cni was
	// there before.
	if m, _ := filepath.Glob("/var/lib/cni/results/" + cniNetwork + "-*"); len(m) > 0 {
		for _, f := range m {
			os.Remove(f)
		}
	}
	// Our bind mount of /run/netns goes when no namespace is mounted in it
	// any more (other tools' namespaces keep it, as `ip netns` would).
	if rec.NetnsMount {
		if m := mountsUnder(netnsDir); len(m) == 1 && m[0] == netnsDir {
			if err := syscall.Unmount(netnsDir, 0); err != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", netnsDir, err))
			}
		}
	}
	// Longest first: a created path inside another one goes first.
	slices.SortFunc(rec.Created, func(a, b string) int { return len(b) - len(a) })
	for _, p := range rec.Created {
		if m := mountsUnder(p); len(m) > 0 {
			errs = append(errs, fmt.Errorf("keep %s: still mounted: %s", p, strings.Join(m, " ")))
			continue
		}
		// Other tools keep namespaces in /run/netns: remove it only empty.
		rm := os.RemoveAll
		if p == "/run/netns" {
			rm = os.Remove
		}
		if err := rm(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		if err := os.Remove(l.hostRecord()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// mountsUnder lists the mount points at or below dir, deepest first.
// mountinfo names mount points with symbolic links resolved, so dir is
// resolved too (a state directory reached through a linked .cache).
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	dir = filepath.Clean(dir)
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	slices.SortFunc(out, func(a, b string) int { return len(b) - len(a) })
	return slices.Compact(out)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder detaches every mount at or below dir, repeating because
// the kubelet's root bind mount may be stacked more than once.
func unmountUnder(dir string) error {
	for range 5 {
		m := mountsUnder(dir)
		if len(m) == 0 {
			return nil
		}
		for _, mp := range m {
			_ = syscall.Unmount(mp, syscall.MNT_DETACH)
		}
	}
	if m := mountsUnder(dir); len(m) > 0 {
		return fmt.Errorf("unmount under %s: still mounted: %s", dir, strings.Join(m, " "))
	}
	return nil
}

// sweepNetns removes pod network namespaces containerd made (cni-*) that
// hold an address in PodCIDR — ours, left behind when the runtime died before tearing the
// pod's network down. Removing the last reference deletes the namespace
// and with it the pod's veth pair.
func sweepNetns() error {
	ents, _ := os.ReadDir("/run/netns")
	var errs []error
	_, pods, _ := net.ParseCIDR(PodCIDR)
	for _, e := range ents {
		p := filepath.Join("/run/netns", e.Name())
		// Other tests keep namespaces here too, some with addresses in
		// 198.18.0.0/15: both the name and the address must match.
		if !strings.HasPrefix(e.Name(), "cni-") || !ours(p, pods) {
			continue
		}
		_ = syscall.Unmount(p, syscall.MNT_DETACH)
		if err := os.Remove(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func ours(nsPath string, pods *net.IPNet) bool {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return false
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return false
	}
	return slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return pods.Contains(a.IP) })
}

// kubepodsCgroups are the kubelet's pod cgroups (cgroupfs driver, cgroup
// root "/") in every hierarchy, parents before children.
func kubepodsCgroups() []string {
	var out []string
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if _, err := os.Stat("/sys/fs/cgroup/kubepods"); err == nil {
		roots = append(roots, "/sys/fs/cgroup/kubepods")
	}
	for _, r := range roots {
		_ = filepath.WalkDir(r, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				out = append(out, p)
			}
			return nil
		})
	}
	return out
}

// sweepCgroups kills every process left in a pod cgroup, then removes the
// cgroups, children first. A killed process keeps its cgroup busy until
// its parent (or init, once a killed shim orphaned it) has reaped it,
// which on a loaded machine takes a while: a cgroup still busy is asked
// again, its processes killed again, for up to 10 s.
func sweepCgroups() error {
	cgs := kubepodsCgroups()
	kill := func() (alive int) {
		for _, cg := range cgs {
			b, _ := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && running(pid) {
					_ = syscall.Kill(pid, syscall.SIGKILL)
					alive++
				}
			}
		}
		return alive
	}
	for range 20 {
		if kill() == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	deadline := time.Now().Add(10 * time.Second)
	var errs []error
	for _, cg := range slices.Backward(cgs) {
		for {
			err := syscall.Rmdir(cg)
			if err == nil || errors.Is(err, syscall.ENOENT) {
				break
			}
			if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", cg, err))
				break
			}
			kill()
			time.Sleep(100 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}
