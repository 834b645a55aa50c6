// Command amberctl shows and manages a node's amber datapath: programs and
// links per interface, the membership map, listener registration and the
// capture counters, read from the pins under /sys/fs/bpf/amber.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"text/tabwriter"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
)

const usage = `usage: amberctl [flags] <command>

commands:
  status      programs and links per interface, membership, listeners,
              counters and host routing (the default)
  uninstall   detach every program, remove the pins and the host routing

flags:
`

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "amberctl:", err)
		os.Exit(1)
	}
}

func run(_ context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("amberctl", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	pinRoot := fs.String("pin-root", bpf.DefaultPinRoot, "bpffs directory holding amber's pins")
	output := fs.String("o", "text", "output format: text or json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cmd := "status"
	if fs.NArg() > 0 {
		cmd = fs.Arg(0)
	}
	switch cmd {
	case "status":
		st, err := bpf.Inspect(*pinRoot, func() error { return hostnet.Check(hostnet.Config{}) })
		if err != nil {
			return err
		}
		switch *output {
		case "json":
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			return enc.Encode(st)
		case "text":
			return printStatus(out, st)
		}
		return fmt.Errorf("unknown output format %q", *output)
	case "uninstall":
		return errors.Join(bpf.Uninstall(bpf.Config{PinRoot: *pinRoot}), hostnet.Remove(hostnet.Config{}))
	}
	fs.Usage()
	return errors.New("unknown command " + cmd)
}

func ifname(idx int) string {
	if i, err := net.InterfaceByIndex(idx); err == nil {
		return i.Name
	}
	return "?"
}

func printStatus(w io.Writer, st *bpf.Status) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "pin root:\t%s\n", st.PinRoot)
	fmt.Fprintf(tw, "host routing:\t%s\n", st.Routing)
	fmt.Fprintln(tw)

	fmt.Fprintln(tw, "INTERFACE\tIFINDEX\tROLE\tHOOK\tPROGRAM\tPROG ID\tLINK ID\tSTATE")
	for _, a := range st.Attachments {
		state := "attached"
		if !a.Live {
			state = "stale (interface gone)"
		}
		iface, idx := ifname(a.Ifindex), fmt.Sprint(a.Ifindex)
		if a.Role == bpf.RoleNode {
			iface, idx = fmt.Sprintf("netns:[%d]", a.Netns), "-"
			if !a.Live {
				state = "stale (namespace gone)"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", iface, idx, a.Role, a.Hook, a.Program, a.ProgID, a.LinkID, state)
	}
	fmt.Fprintln(tw)

	captured := map[int]bool{}
	for _, i := range st.Captured {
		captured[i] = true
	}
	fmt.Fprintln(tw, "POD ADDRESS\tVETH\tIFINDEX\tCAPTURED")
	for _, m := range st.Members {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%v\n", m.Addr, ifname(m.Ifindex), m.Ifindex, captured[m.Ifindex])
	}
	fmt.Fprintln(tw)

	fmt.Fprintln(tw, "LISTENER\tFAMILY\tREGISTERED\tSOCKET COOKIE")
	for _, l := range st.Listeners {
		cookie := "-"
		if l.Registered {
			cookie = fmt.Sprint(l.Cookie)
		}
		fmt.Fprintf(tw, "%s\tipv%d\t%v\t%s\n", l.Listener, l.Family, l.Registered, cookie)
	}
	fmt.Fprintln(tw)

	reasons, err := bpf.Reasons()
	if err != nil {
		return err
	}
	fmt.Fprintln(tw, "COUNTER\tPACKETS")
	for _, r := range reasons { // enum order: pass, assign, drop
		fmt.Fprintf(tw, "%s\t%d\n", r, st.Counters[r.String()])
	}
	return tw.Flush()
}
