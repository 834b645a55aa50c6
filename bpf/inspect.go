package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// Status is a node's datapath as its pins show it: what amberctl prints.
type Status struct {
	PinRoot     string         `json:"pin_root"`
	Attachments []Attachment   `json:"attachments"`
	Members     []Member       `json:"members"`
	Captured    []int          `json:"captured_ifindexes"`
	Listeners   []ListenerSlot `json:"listeners"`
	Counters    Counters       `json:"counters"`
	Routing     string         `json:"routing"` // "ok" or what is missing
}

// Inspect reads everything pinned under root without loading programs.
// routing checks the host routing (hostnet.Check, passed in by the
// caller: this package knows no netlink); its error goes to
// Status.Routing.
func Inspect(root string, routing func() error) (*Status, error) {
	if root == "" {
		root = DefaultPinRoot
	}
	if _, err := os.Stat(root); err != nil {
		return nil, fmt.Errorf("nothing pinned at %s (is the agent running?): %w", root, err)
	}
	st := &Status{PinRoot: root, Routing: "ok"}
	var err error
	if st.Attachments, err = Attachments(root); err != nil {
		return nil, err
	}
	pods, err := ebpf.LoadPinnedMap(filepath.Join(root, captureMapAmberPods), nil)
	if err != nil {
		return nil, fmt.Errorf("open membership: %w", err)
	}
	defer pods.Close()
	if st.Members, err = readMembers(pods); err != nil {
		return nil, err
	}
	ifaces, err := ebpf.LoadPinnedMap(filepath.Join(root, captureMapAmberIfaces), nil)
	if err != nil {
		return nil, fmt.Errorf("open interfaces: %w", err)
	}
	defer ifaces.Close()
	if st.Captured, err = readIfaces(ifaces); err != nil {
		return nil, err
	}
	ls, err := OpenListeners(root)
	if err != nil {
		return nil, err
	}
	defer ls.Close()
	if st.Listeners, err = ls.Slots(); err != nil {
		return nil, err
	}
	if st.Counters, err = ReadCounters(root); err != nil {
		return nil, err
	}
	if err := routing(); err != nil {
		st.Routing = err.Error()
	}
	return st, nil
}

// Uninstall detaches every pinned link and removes the pinned maps and
// the pin root; the host routing is hostnet.Remove's. What is not there
// is not an error.
func Uninstall(cfg Config) error {
	root := cfg.pinRoot()
	var errs []error
	atts, err := Attachments(root)
	errs = append(errs, err)
	for _, a := range atts {
		errs = append(errs, detachPinned(a.Pin))
	}
	for _, name := range []string{captureMapAmberPods, captureMapAmberIfaces, captureMapAmberListeners, captureMapAmberCounters} {
		if err := os.Remove(filepath.Join(root, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, dir := range []string{filepath.Join(root, linksDir), root} {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}
