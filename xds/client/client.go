// Package client is a delta-ADS client: it subscribes to resource types,
// wildcard or by name, hands each response to its type's Handler, ACKs or
// NACKs it per resource, and reconnects announcing what it holds. Its
// default types keep a state.Store in step with a control plane (istiod,
// or amber's local server) over Istio's workload API, as a ztunnel does.
package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/xds/state"
)

// Sentinel errors: the exported ones come from New and Run; errUnknownType
// is the reason given in NACKs of types the client never asked for.
var (
	ErrNoConn  = errors.New("xds client: neither Conn nor Dial set")
	ErrRunning = errors.New("xds client: already running")
	ErrClosed  = errors.New("xds client: closed")
	ErrTypes   = errors.New("xds client: invalid types")

	errUnknownType = errors.New("type not subscribed")
)

// Node identifies this ztunnel to the control plane.
type Node struct {
	// IP is the ztunnel's own IP. Zero means 127.0.0.1.
	IP netip.Addr
	// PodName and PodNamespace name the ztunnel pod. Empty is accepted by
	// the local server; istiod needs both.
	PodName      string
	PodNamespace string
	// Metadata is sent as the node metadata unchanged (for istiod, e.g.
	// NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, CLUSTER_ID). Nil sends none.
	Metadata *structpb.Struct
}

// ID is the node id in the form Istio's ztunnel uses; istiod reads the
// proxy type, IP, pod and namespace from it:
// ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local.
func (n Node) ID() string {
	ip := n.IP
	if !ip.IsValid() {
		ip = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	return fmt.Sprintf("ztunnel~%s~%s.%s~%s.svc.cluster.local", ip, n.PodName, n.PodNamespace, n.PodNamespace)
}

// Config configures a Client. Exactly one of Conn and Dial must be set.
// Credentials (istiod wants TLS and a bearer token) and keepalive are the
// connection's business: without keepalive (grpc.WithKeepaliveParams) a
// control plane lost to a network partition is noticed only when TCP gives
// up, and a control plane is silent between pushes by design.
type Config struct {
	// Conn is a channel to the control plane, shared with other users; the
	// client opens one stream on it at a time and never closes it. gRPC
	// reconnects the channel underneath.
	Conn grpc.ClientConnInterface
	// Dial opens a fresh connection for each stream attempt; the client
	// closes it when the stream ends. Nil means use Conn.
	Dial func(ctx context.Context) (*grpc.ClientConn, error)
	// Node identifies this ztunnel; see Node for the zero value. Ignored
	// when XDSNode is set.
	Node Node
	// XDSNode, if set, is sent as the node as it is (another proxy type,
	// e.g. a waypoint's, with its own metadata). Nil means Node's.
	XDSNode *corev3.Node
	// Types are the resource types to subscribe to, in the order of their
	// first requests. Nil means a ztunnel's: WorkloadAPI(Store, Logger).
	Types []Type
	// Store receives the mesh state of the default Types. Nil means a new
	// empty store (see Client.Store).
	Store *state.Store
	// Logger gets connection and NACK events. Nil discards them.
	Logger *slog.Logger
	// InitialBackoff is the first reconnect delay. Zero means 100ms.
	InitialBackoff time.Duration
	// MaxBackoff caps the reconnect delay. Zero means 15s.
	MaxBackoff time.Duration
}

// Client is a delta-ADS client. Its handlers keep the last good state
// while the control plane is unreachable.
type Client struct {
	cfg   Config
	store *state.Store
	log   *slog.Logger
	node  *corev3.Node

	closing chan struct{}
	wg      sync.WaitGroup

	synced chan struct{}
	// types are the subscriptions, in order, and byURL indexes them.
	// Their per-type state is owned by the Run goroutine.
	types    []*subscription
	byURL    map[string]*subscription
	isSynced bool // owned by the Run goroutine

	mu        sync.Mutex // guards the fields below
	running   bool
	closed    bool
	stats     Stats
	rejected  map[string]map[string]Rejection
	connected bool
}

// subscription is one Type and what the client holds of it.
type subscription struct {
	Type
	// known holds the version of every resource applied: what the next
	// stream announces in initial_resource_versions. A rejected resource
	// is announced with an empty version, which matches none, so that the
	// server resends it or reports it removed.
	known map[string]string
	// answered: a response of the type was handled (Synced).
	answered bool

	// started and names are the current stream's: whether the first
	// request was sent, and (named types) the names subscribed.
	started bool
	names   map[string]bool
}

// New returns a client; call Run to start it.
func New(cfg Config) (*Client, error) {
	if cfg.Conn == nil && cfg.Dial == nil {
		return nil, ErrNoConn
	}
	if cfg.InitialBackoff <= 0 {
		cfg.InitialBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 15 * time.Second
	}
	c := &Client{
		cfg:      cfg,
		store:    cfg.Store,
		log:      cfg.Logger,
		node:     cfg.XDSNode,
		closing:  make(chan struct{}),
		synced:   make(chan struct{}),
		byURL:    make(map[string]*subscription),
		rejected: make(map[string]map[string]Rejection),
		stats:    Stats{Rejected: make(map[Reason]uint64), Types: make(map[string]TypeStats)},
	}
	if c.node == nil {
		c.node = &corev3.Node{Id: cfg.Node.ID(), Metadata: cfg.Node.Metadata}
	}
	if c.store == nil {
		c.store = state.NewStore()
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	types := cfg.Types
	if types == nil {
		types = WorkloadAPI(c.store, c.log)
	}
	if len(types) == 0 {
		return nil, fmt.Errorf("%w: none", ErrTypes)
	}
	for _, t := range types {
		switch {
		case t.URL == "" || t.Handler == nil:
			return nil, fmt.Errorf("%w: %q needs a URL and a Handler", ErrTypes, t.URL)
		case c.byURL[t.URL] != nil:
			return nil, fmt.Errorf("%w: %q twice", ErrTypes, t.URL)
		}
		sub := &subscription{Type: t, known: make(map[string]string)}
		c.types = append(c.types, sub)
		c.byURL[t.URL] = sub
		c.rejected[t.URL] = make(map[string]Rejection)
	}
	return c, nil
}

// Store returns the store the default types write.
func (c *Client) Store() *state.Store { return c.store }

// Synced is closed once a response of each wildcard type, and of each
// named type that has names, has been applied (even if some of its
// resources were NACKed): from then on the handlers reflect the control
// plane rather than an empty start.
func (c *Client) Synced() <-chan struct{} { return c.synced }

// Run connects and keeps the store in step until ctx is done (returning
// ctx.Err()) or Close is called (returning ErrClosed). Lost streams are
// reopened with exponential backoff and jitter; the store keeps the last
// good state meanwhile.
func (c *Client) Run(ctx context.Context) error {
	c.mu.Lock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return ErrClosed
	case c.running:
		c.mu.Unlock()
		return ErrRunning
	}
	c.running = true
	c.wg.Add(1)
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.running = false
		c.mu.Unlock()
		c.wg.Done()
	}()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go c.cancelOnClose(ctx, cancel)

	b := backoff{initial: c.cfg.InitialBackoff, max: c.cfg.MaxBackoff}
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			c.count(func(s *Stats) { s.Reconnects++ })
		}
		gotResponse, err := c.runStream(ctx)
		c.setConnected(false)
		if ctx.Err() != nil {
			return c.exitErr(ctx)
		}
		c.count(func(s *Stats) { s.Disconnects++ })
		if gotResponse {
			b.reset()
		}
		d := b.next()
		c.log.Warn("xds stream ended, reconnecting", logkey.Error, err, logkey.Backoff, d)
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return c.exitErr(ctx)
		case <-t.C:
		}
	}
}

// cancelOnClose ties Run's context to Close.
func (c *Client) cancelOnClose(ctx context.Context, cancel context.CancelFunc) {
	select {
	case <-c.closing:
		cancel()
	case <-ctx.Done():
	}
}

func (c *Client) exitErr(ctx context.Context) error {
	select {
	case <-c.closing:
		return ErrClosed
	default:
		return ctx.Err()
	}
}

// Close stops Run and waits for it to return. The store keeps its state.
func (c *Client) Close() error {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.closing)
	}
	c.mu.Unlock()
	c.wg.Wait()
	return nil
}

func (c *Client) setConnected(v bool) {
	c.mu.Lock()
	c.connected = v
	c.mu.Unlock()
}

func (c *Client) count(f func(*Stats)) {
	c.mu.Lock()
	f(&c.stats)
	c.mu.Unlock()
}
