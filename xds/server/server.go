package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/xds/workloadapi"
)

// ErrClosed is returned by Serve after Close.
var ErrClosed = errors.New("xds server: closed")

// Config configures a Server.
type Config struct {
	// File is the mesh file to serve (format in the package doc). Empty
	// means serve only what Set and Replace put in.
	File string
	// PollInterval is how often Serve checks File for changes. Zero means
	// one second; negative disables polling (call Reload, e.g. on SIGHUP).
	PollInterval time.Duration
	// Logger gets reloads, warnings, streams and NACKs. Nil discards them.
	Logger *slog.Logger
}

// Server is a delta-ADS server of the workload API. It is safe for
// concurrent use.
type Server struct {
	cfg   Config
	log   *slog.Logger
	nonce atomic.Uint64
	done  chan struct{}

	mu        sync.Mutex // guards the fields below
	resources map[string]map[string]resource
	version   uint64
	changed   chan struct{} // closed and replaced on every change
	streams   map[*stream]struct{}
	servers   map[*grpc.Server]struct{}
	closed    bool
	fileStamp os.FileInfo
}

// resource is one served resource; a nil body is served as a Resource
// without one (for tests of malformed input).
type resource struct {
	body    *anypb.Any
	version string
}

// New returns a server, loading cfg.File if set.
func New(cfg Config) (*Server, error) {
	if cfg.PollInterval == 0 {
		cfg.PollInterval = time.Second
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		done:      make(chan struct{}),
		resources: make(map[string]map[string]resource),
		changed:   make(chan struct{}),
		streams:   make(map[*stream]struct{}),
		servers:   make(map[*grpc.Server]struct{}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if cfg.File != "" {
		if err := s.Reload(); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Register adds the ADS service to g. Streams end when s is closed.
func (s *Server) Register(g *grpc.Server) {
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, ads{s: s})
}

// Serve serves gRPC on lis, and polls File for changes, until ctx is done
// (returning ctx.Err()) or Close is called (returning ErrClosed).
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	// Initial requests list every resource a reconnecting client holds;
	// allow more than gRPC's 4 MiB default for big meshes.
	g := grpc.NewServer(grpc.MaxRecvMsgSize(64 << 20))
	s.Register(g)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		lis.Close()
		return ErrClosed
	}
	s.servers[g] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.servers, g)
		s.mu.Unlock()
	}()

	var wg sync.WaitGroup
	defer wg.Wait() // after cancel below
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if s.cfg.File != "" && s.cfg.PollInterval > 0 {
		wg.Go(func() { s.watchFile(ctx) })
	}
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(lis) }()
	select {
	case err := <-errc:
		// Close may have stopped g before this select saw s.done.
		select {
		case <-s.done:
			return ErrClosed
		default:
		}
		return fmt.Errorf("serve xds: %w", err)
	case <-ctx.Done():
		g.Stop()
		<-errc
		return ctx.Err()
	case <-s.done:
		g.Stop()
		<-errc
		return ErrClosed
	}
}

// Close ends all streams and stops the gRPC servers Serve started.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.done)
	servers := maps.Clone(s.servers)
	s.mu.Unlock()
	for g := range servers {
		g.Stop()
	}
	return nil
}

// Set adds or replaces a resource and pushes it to subscribed clients. body
// is served as given, so tests can push malformed resources; a nil body is
// served as a Resource with no body.
func (s *Server) Set(typeURL, name string, body *anypb.Any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.setLocked(typeURL, name, body) {
		s.notifyLocked()
	}
}

// Delete removes a resource; subscribed clients get it in removed_resources.
func (s *Server) Delete(typeURL, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.resources[typeURL][name]; ok {
		delete(s.resources[typeURL], name)
		s.notifyLocked()
	}
}

// Replace makes r the complete set of workload API resources, as a reload
// of the mesh file does; resources of other types are kept. Clients get
// only the difference.
func (s *Server) Replace(r *Resources) error {
	next, err := r.anys()
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	for typeURL, want := range next {
		for name := range s.resources[typeURL] {
			if _, keep := want[name]; !keep {
				delete(s.resources[typeURL], name)
				changed = true
			}
		}
		for name, body := range want {
			changed = s.setLocked(typeURL, name, body) || changed
		}
	}
	if changed {
		s.notifyLocked()
	}
	return nil
}

func (s *Server) setLocked(typeURL, name string, body *anypb.Any) bool {
	v := resourceVersion(body)
	m := s.resources[typeURL]
	if m == nil {
		m = make(map[string]resource)
		s.resources[typeURL] = m
	}
	if old, ok := m[name]; ok && old.version == v {
		return false
	}
	m[name] = resource{body: body, version: v}
	return true
}

func (s *Server) notifyLocked() {
	s.version++
	close(s.changed)
	s.changed = make(chan struct{})
}

// resourceVersion is a content hash, so a client reconnecting with
// initial_resource_versions is sent only what really changed, even across
// server restarts.
func resourceVersion(body *anypb.Any) string {
	if body == nil {
		return "none"
	}
	h := sha256.New()
	h.Write([]byte(body.GetTypeUrl()))
	h.Write([]byte{0})
	h.Write(body.GetValue())
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// Reload re-reads the mesh file and pushes the difference. On error the
// served resources are unchanged.
func (s *Server) Reload() error {
	if s.cfg.File == "" {
		return errors.New("reload: no mesh file configured")
	}
	fi, err := os.Stat(s.cfg.File)
	if err != nil {
		return fmt.Errorf("reload %s: %w", s.cfg.File, err)
	}
	data, err := os.ReadFile(s.cfg.File)
	if err != nil {
		return fmt.Errorf("reload %s: %w", s.cfg.File, err)
	}
	r, err := ParseMesh(data)
	if err != nil {
		return fmt.Errorf("reload %s: %w", s.cfg.File, err)
	}
	for _, w := range r.Warnings {
		s.log.Warn("mesh file", logkey.File, s.cfg.File, logkey.Warning, w)
	}
	if err := s.Replace(r); err != nil {
		return fmt.Errorf("reload %s: %w", s.cfg.File, err)
	}
	s.mu.Lock()
	s.fileStamp = fi
	s.mu.Unlock()
	s.log.Info("mesh file loaded", logkey.File, s.cfg.File, logkey.Addresses, len(r.Addresses), logkey.Authorizations, len(r.Authorizations))
	return nil
}

// watchFile reloads the mesh file when its size, mtime or inode changes
// (editors often replace a file rather than rewrite it).
func (s *Server) watchFile(ctx context.Context) {
	t := time.NewTicker(s.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fi, err := os.Stat(s.cfg.File)
		if err != nil {
			continue // mid-replace; try again next tick
		}
		s.mu.Lock()
		old := s.fileStamp
		s.mu.Unlock()
		if old != nil && os.SameFile(old, fi) && old.ModTime().Equal(fi.ModTime()) && old.Size() == fi.Size() {
			continue
		}
		if err := s.Reload(); err != nil {
			s.log.Error("mesh file reload failed, keeping previous state", logkey.Error, err)
			// Do not retry the same broken content every tick.
			s.mu.Lock()
			s.fileStamp = fi
			s.mu.Unlock()
		}
	}
}

// anys marshals the resources deterministically (map order fixed) so that
// their versions are stable across reloads.
func (r *Resources) anys() (map[string]map[string]*anypb.Any, error) {
	out := map[string]map[string]*anypb.Any{
		workloadapi.AddressTypeURL:       make(map[string]*anypb.Any, len(r.Addresses)),
		workloadapi.AuthorizationTypeURL: make(map[string]*anypb.Any, len(r.Authorizations)),
	}
	opts := proto.MarshalOptions{Deterministic: true}
	for name, a := range r.Addresses {
		b, err := opts.Marshal(a)
		if err != nil {
			return nil, fmt.Errorf("marshal address %s: %w", name, err)
		}
		out[workloadapi.AddressTypeURL][name] = &anypb.Any{TypeUrl: workloadapi.AddressTypeURL, Value: b}
	}
	for name, p := range r.Authorizations {
		b, err := opts.Marshal(p)
		if err != nil {
			return nil, fmt.Errorf("marshal authorization %s: %w", name, err)
		}
		out[workloadapi.AuthorizationTypeURL][name] = &anypb.Any{TypeUrl: workloadapi.AuthorizationTypeURL, Value: b}
	}
	return out, nil
}
