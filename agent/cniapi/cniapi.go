// Package cniapi is the contract between the amber-cni plugin and the node
// agent: a small JSON-over-HTTP API on a unix socket (the plugin asks, the
// agent decides and captures), and the API-server access file the plugin
// falls back to when the agent cannot be reached.
package cniapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/amber-mesh/amber/internal/atomicfile"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"
)

// Defaults shared by the agent, the plugin and the manifests.
const (
	// DefaultSocket is where the agent serves the API.
	DefaultSocket = "/var/run/amber/cni.sock"
	// DefaultAPIAccess is the API-server access file the agent writes for
	// the plugin.
	DefaultAPIAccess = "/var/run/amber/cni-apiserver.json"
)

// Sentinel errors.
var (
	// ErrUnreachable is returned by Client when no agent answers on the
	// socket (missing socket, connection refused): the plugin must then
	// decide on its own.
	ErrUnreachable = errors.New("amber agent unreachable")
)

// AddRequest is a CNI ADD as the agent needs it.
type AddRequest struct {
	ContainerID  string `json:"containerID"`
	NetNS        string `json:"netns"`
	IfName       string `json:"ifName"`
	PodNamespace string `json:"podNamespace"`
	PodName      string `json:"podName"`
	// PodUID is K8S_POD_UID when the runtime passes it; empty otherwise.
	PodUID string `json:"podUID,omitempty"`
	// IPs are the pod's addresses from the previous plugin's result.
	IPs []netip.Addr `json:"ips"`
}

// AddResponse is the agent's answer to a successful ADD.
type AddResponse struct {
	// Captured is true when the pod is enrolled and its capture is in
	// place; false when the pod is outside the mesh.
	Captured bool `json:"captured"`
	// Reason is the enrolment reason (enrol.Reason).
	Reason string `json:"reason"`
	// Veth is the host-side interface the datapath attached to.
	Veth string `json:"veth,omitempty"`
}

// DelRequest is a CNI DEL.
type DelRequest struct {
	ContainerID  string `json:"containerID"`
	PodNamespace string `json:"podNamespace"`
	PodName      string `json:"podName"`
	PodUID       string `json:"podUID,omitempty"`
}

// Handler is the agent's side of the API.
type Handler interface {
	// Add returns only once an enrolled pod's capture is in place; an
	// error fails the pod's ADD.
	Add(ctx context.Context, req *AddRequest) (*AddResponse, error)
	// Del releases what Add put in place for the sandbox.
	Del(ctx context.Context, req *DelRequest) error
}

type errorBody struct {
	Error string `json:"error"`
}

// Paths of the API.
const (
	addPath = "/v1/cni/add"
	delPath = "/v1/cni/del"
)

// maxBody bounds request bodies: a CNI request is a few hundred bytes.
const maxBody = 64 << 10

// Handle serves h over HTTP.
func Handle(h Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+addPath, func(w http.ResponseWriter, r *http.Request) {
		var req AddRequest
		if !decode(w, r, &req) {
			return
		}
		if req.PodName == "" || req.PodNamespace == "" {
			reply(w, http.StatusBadRequest, errorBody{"pod name and namespace are required"})
			return
		}
		resp, err := h.Add(r.Context(), &req)
		if err != nil {
			reply(w, http.StatusInternalServerError, errorBody{err.Error()})
			return
		}
		reply(w, http.StatusOK, resp)
	})
	mux.HandleFunc("POST "+delPath, func(w http.ResponseWriter, r *http.Request) {
		var req DelRequest
		if !decode(w, r, &req) {
			return
		}
		if err := h.Del(r.Context(), &req); err != nil {
			reply(w, http.StatusInternalServerError, errorBody{err.Error()})
			return
		}
		reply(w, http.StatusOK, struct{}{})
	})
	return mux
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		reply(w, http.StatusBadRequest, errorBody{fmt.Sprintf("bad request: %v", err)})
		return false
	}
	return true
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// Listen creates the socket at path (replacing a stale one left by an
// earlier agent), reachable by root only.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("cni socket dir: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale cni socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on cni socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("cni socket mode: %w", err)
	}
	return ln, nil
}

// Client calls the agent. The zero value uses DefaultSocket.
type Client struct {
	// Socket is the agent's socket. Zero means DefaultSocket.
	Socket string
}

// Add asks the agent to handle an ADD. ErrUnreachable means no agent
// answered; any other error is the agent's refusal or a broken exchange,
// and the pod must not start.
func (c *Client) Add(ctx context.Context, req *AddRequest) (*AddResponse, error) {
	var resp AddResponse
	if err := c.call(ctx, addPath, req, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// Del asks the agent to handle a DEL.
func (c *Client) Del(ctx context.Context, req *DelRequest) error {
	return c.call(ctx, delPath, req, &struct{}{})
}

func (c *Client) call(ctx context.Context, path string, req, resp any) error {
	sock := c.Socket
	if sock == "" {
		sock = DefaultSocket
	}
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	var dialErr atomic.Bool
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			conn, err := (&net.Dialer{}).DialContext(ctx, "unix", sock)
			if err != nil {
				dialErr.Store(true)
			}
			return conn, err
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://amber-agent"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hresp, err := (&http.Client{Transport: tr}).Do(hreq)
	if err != nil {
		if dialErr.Load() {
			return fmt.Errorf("%w at %s: %w", ErrUnreachable, sock, err)
		}
		return fmt.Errorf("amber agent at %s: %w", sock, err)
	}
	defer hresp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(hresp.Body, maxBody))
	if err != nil {
		return fmt.Errorf("amber agent at %s: read answer: %w", sock, err)
	}
	if hresp.StatusCode != http.StatusOK {
		var e errorBody
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = fmt.Sprintf("status %d", hresp.StatusCode)
		}
		return fmt.Errorf("amber agent: %s", e.Error)
	}
	if err := json.Unmarshal(data, resp); err != nil {
		return fmt.Errorf("amber agent at %s: bad answer: %w", sock, err)
	}
	return nil
}

// APIAccess lets the plugin read pods and namespaces from the API server
// when the agent is down, with the agent's credentials. It is written by
// the agent (0600, root) and refreshed when its token rotates.
type APIAccess struct {
	// Server is the API server's URL.
	Server string `json:"server"`
	// CAData is the PEM bundle that verifies the server. Empty means the
	// system roots.
	CAData []byte `json:"caData,omitempty"`
	// Token is a bearer token; CertData/KeyData a client certificate.
	Token    string `json:"token,omitempty"`
	CertData []byte `json:"certData,omitempty"`
	KeyData  []byte `json:"keyData,omitempty"`
	// Written is when the agent wrote the file.
	Written time.Time `json:"written"`
}

// WriteAPIAccess replaces the file at path atomically.
func WriteAPIAccess(path string, a APIAccess) error {
	data, err := json.Marshal(a)
	if err != nil {
		return err
	}
	return atomicfile.Write(path, data, 0o600, 0o700)
}

// ReadAPIAccess reads the file written by WriteAPIAccess.
func ReadAPIAccess(path string) (APIAccess, error) {
	var a APIAccess
	data, err := os.ReadFile(path)
	if err != nil {
		return a, fmt.Errorf("read api access: %w", err)
	}
	if err := json.Unmarshal(data, &a); err != nil {
		return a, fmt.Errorf("parse api access %s: %w", path, err)
	}
	if a.Server == "" {
		return a, fmt.Errorf("api access %s: no server", path)
	}
	return a, nil
}
