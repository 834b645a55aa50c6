package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/proxy"
)

// dataListener is one of the data plane's listeners with its role, which
// names its slots in the datapath's listener map and the proxy handler
// that serves it, and its socket for each family: the same dual-stack
// socket twice, or none for a family the host lacks.
type dataListener struct {
	role   bpf.Listener
	v4, v6 *net.TCPListener
}

// dataListeners are the data plane's listeners, in the order of their
// roles.
type dataListeners []dataListener

// listenData opens the data plane's listeners: transparent, MPTCP off.
// With the datapath, 15001 and 15006 listen on loopback, a socket per
// family, where the network cannot reach them; the datapath assigns their
// SYNs whatever their address. 15008 listens on [::] (its clients address
// podIP:15008, the kernel's own listener lookup must find it), and so
// does everything without the datapath (nftables TPROXY finds its socket
// by address). ARCHITECTURE.md, "Listener addresses".
func listenData(ctx context.Context, cfg Config, log *slog.Logger) (dataListeners, error) {
	var lns dataListeners
	for _, l := range []struct {
		role bpf.Listener
		port uint16
	}{
		{bpf.Outbound, cfg.Ports.Outbound},
		{bpf.Inbound, cfg.Ports.Inbound},
		{bpf.HBONE, cfg.Ports.HBONE},
	} {
		dl := dataListener{role: l.role}
		var err error
		if !cfg.NoCapture && l.role != bpf.HBONE {
			dl.v4, dl.v6, err = cfg.Sockets.ListenLoopback(ctx, l.port)
			if err == nil && dl.v6 == nil {
				log.Info("no IPv6 loopback: captured IPv6 connections find no listener and fail closed", logkey.Listener, l.role)
			}
		} else {
			dl.v4, err = cfg.Sockets.Listen(ctx, "[::]:"+strconv.Itoa(int(l.port)))
			dl.v6 = dl.v4
		}
		if err != nil {
			return nil, errors.Join(err, lns.Close())
		}
		lns = append(lns, dl)
	}
	return lns, nil
}

// handler is the proxy's accept loop for dl's role.
func (dl dataListener) handler(px *proxy.Proxy) func(net.Listener) error {
	switch dl.role {
	case bpf.Outbound:
		return px.ServeOutbound
	case bpf.Inbound:
		return px.ServeInbound
	}
	return px.ServeHBONE
}

// each calls fn for every family that has a socket.
func (dl dataListener) each(fn func(bpf.Family, *net.TCPListener)) {
	if dl.v4 != nil {
		fn(bpf.IPv4, dl.v4)
	}
	if dl.v6 != nil {
		fn(bpf.IPv6, dl.v6)
	}
}

// sockets are dl's distinct sockets.
func (dl dataListener) sockets() []*net.TCPListener {
	switch {
	case dl.v6 == nil || dl.v6 == dl.v4:
		return []*net.TCPListener{dl.v4}
	case dl.v4 == nil:
		return []*net.TCPListener{dl.v6}
	}
	return []*net.TCPListener{dl.v4, dl.v6}
}

// Close closes every socket. The proxy closes those it serves; a socket
// already closed is not an error.
func (lns dataListeners) Close() error {
	var errs []error
	for _, dl := range lns {
		for _, ln := range dl.sockets() {
			if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs = append(errs, fmt.Errorf("close %s listener: %w", dl.role, err))
			}
		}
	}
	return errors.Join(errs...)
}

// register puts the listeners into the datapath's listener map, each in
// its role's slots. The node agent pins that map: a ztunnel started first
// (both containers of the DaemonSet's pod start together) waits for it,
// up to ctx.
func (lns dataListeners) register(ctx context.Context, root string, log *slog.Logger) error {
	ls, err := bpf.OpenListeners(root)
	for waited := false; errors.Is(err, fs.ErrNotExist); ls, err = bpf.OpenListeners(root) {
		if !waited {
			log.Info("waiting for the agent to pin the datapath", logkey.PinRoot, root)
			waited = true
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (gave up: %v)", err, context.Cause(ctx))
		case <-time.After(250 * time.Millisecond):
		}
	}
	if err != nil {
		return err
	}
	defer ls.Close()
	for _, dl := range lns {
		dl.each(func(f bpf.Family, ln *net.TCPListener) {
			if err == nil {
				err = ls.Register(dl.role, f, ln)
			}
		})
	}
	return err
}

// unregister takes the listeners out of the datapath's listener map,
// leaving alone the slots a newer ztunnel took over. It reports whether
// the map could be opened.
func (lns dataListeners) unregister(root string, log *slog.Logger) bool {
	ls, err := bpf.OpenListeners(root)
	if err != nil {
		log.Warn("drain: open the listener map", logkey.Error, err)
		return false
	}
	defer ls.Close()
	for _, dl := range lns {
		dl.each(func(f bpf.Family, ln *net.TCPListener) {
			if err := ls.UnregisterSocket(dl.role, f, ln); err != nil {
				log.Warn("drain: unregister listener", logkey.Error, err)
			}
		})
	}
	return true
}

// drain hands new connections over to the next ztunnel and lets the
// current ones finish: the listeners leave the datapath's listener map
// first (new SYNs are dropped and retransmitted until the next ztunnel
// registers), handshakes already assigned complete and are accepted, then
// the proxy serves what it has for up to DrainTimeout.
func drain(cfg Config, px *proxy.Proxy, lns dataListeners, log *slog.Logger) {
	timeout := cfg.DrainTimeout
	if timeout < 0 {
		return
	}
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	t0 := time.Now()
	if !cfg.NoCapture && lns.unregister(cfg.PinRoot, log) {
		// A SYN assigned just before is still in its handshake.
		time.Sleep(200 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := px.Drain(ctx); err != nil {
		log.Info("drained; closing the rest", logkey.Took, time.Since(t0).Round(time.Millisecond), logkey.Error, err)
		return
	}
	log.Info("drained", logkey.Took, time.Since(t0).Round(time.Millisecond))
}
