package cniplugin

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/amber-mesh/amber/agent/cniapi"
)

// The test binary doubles as the plugin: exec'd with AMBER_TEST_CNI=1 it
// runs Main, and the tests invoke it the way a container runtime does
// (CNI_* environment, configuration on stdin, result on stdout).
func TestMain(m *testing.M) {
	if os.Getenv("AMBER_TEST_CNI") == "1" {
		Main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const prevResult = `{"cniVersion":"1.0.0","interfaces":[{"name":"veth1234"},{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"address":"10.0.0.5/32","interface":1}]}`

type env struct {
	dir    string
	socket string
	access string
}

func newEnv(t *testing.T) *env {
	dir := t.TempDir()
	return &env{dir: dir, socket: filepath.Join(dir, "cni.sock"), access: filepath.Join(dir, "access.json")}
}

func (e *env) conf(extra map[string]any) []byte {
	c := map[string]any{
		"cniVersion": "1.0.0", "name": "kindnet", "type": Name,
		"agentSocket": e.socket, "apiAccessFile": e.access,
		"prevResult": json.RawMessage(prevResult),
		// Never the node's own pins: an agent running on this machine
		// (a real-node test) would make "no datapath pinned" untrue.
		"pinRoot": filepath.Join(e.dir, "pins"),
	}
	for k, v := range extra {
		c[k] = v
	}
	data, _ := json.Marshal(c)
	return data
}

// invoke runs the plugin like a runtime; it returns stdout and whether
// the plugin succeeded.
func invoke(t *testing.T, command, ns, name string, conf []byte) (string, bool) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "AMBER_TEST_CNI=1",
		"CNI_COMMAND="+command, "CNI_CONTAINERID=c1", "CNI_NETNS=/run/netns/x", "CNI_IFNAME=eth0", "CNI_PATH=/opt/cni/bin",
		"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE="+ns+";K8S_POD_NAME="+name+";K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=uid-"+name)
	cmd.Stdin = bytes.NewReader(conf)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	return out.String() + stderr.String(), err == nil
}

// apiServer serves pods and namespaces the way the API server does.
func apiServer(t *testing.T, e *env, objects map[string]string) *httptest.Server {
	t.Helper()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		obj, ok := objects[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(obj))
	}))
	t.Cleanup(srv.Close)
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := cniapi.WriteAPIAccess(e.access, cniapi.APIAccess{Server: srv.URL, CAData: ca, Token: "tok"}); err != nil {
		t.Fatal(err)
	}
	return srv
}

func nsJSON(name string, ambient bool) string {
	labels := `{}`
	if ambient {
		labels = `{"istio.io/dataplane-mode":"ambient"}`
	}
	return `{"metadata":{"name":"` + name + `","labels":` + labels + `}}`
}

func podJSON(ns, name, labels string, hostNet bool) string {
	hn := "false"
	if hostNet {
		hn = "true"
	}
	return `{"metadata":{"name":"` + name + `","namespace":"` + ns + `","uid":"uid-` + name + `","labels":` + labels + `},"spec":{"nodeName":"n1","hostNetwork":` + hn + `},"status":{"phase":"Pending"}}`
}

func TestAddWithoutAgent(t *testing.T) {
	e := newEnv(t)
	srv := apiServer(t, e, map[string]string{
		"/api/v1/namespaces/mesh":             nsJSON("mesh", true),
		"/api/v1/namespaces/plain":            nsJSON("plain", false),
		"/api/v1/namespaces/mesh/pods/a":      podJSON("mesh", "a", `{}`, false),
		"/api/v1/namespaces/mesh/pods/out":    podJSON("mesh", "out", `{"istio.io/dataplane-mode":"none"}`, false),
		"/api/v1/namespaces/plain/pods/b":     podJSON("plain", "b", `{}`, false),
		"/api/v1/namespaces/plain/pods/c":     podJSON("plain", "c", `{"istio.io/dataplane-mode":"ambient"}`, false),
		"/api/v1/namespaces/plain/pods/h":     podJSON("plain", "h", `{"istio.io/dataplane-mode":"ambient"}`, true),
		"/api/v1/namespaces/plain/pods/other": podJSON("plain", "someone-else", `{}`, false),
	})
	conf := e.conf(nil)
	for _, tc := range []struct {
		ns, name string
		ok       bool
		why      string
	}{
		{"mesh", "a", false, "enrolled"},
		{"mesh", "out", true, ""},
		{"plain", "b", true, ""},
		{"plain", "c", false, "enrolled"},
		{"plain", "h", true, ""},
		{"plain", "missing", false, "cannot prove"},
		{"plain", "other", false, "UID"},
	} {
		out, ok := invoke(t, "ADD", tc.ns, tc.name, conf)
		if ok != tc.ok || !strings.Contains(out, tc.why) {
			t.Errorf("ADD %s/%s: ok=%v, want %v (%q); output %s", tc.ns, tc.name, ok, tc.ok, tc.why, out)
		}
		if ok && !strings.Contains(out, `"10.0.0.5/32"`) {
			t.Errorf("ADD %s/%s did not pass the previous result through: %s", tc.ns, tc.name, out)
		}
	}

	// Excluded namespaces need neither agent nor API server.
	if out, ok := invoke(t, "ADD", "kube-system", "dns", e.conf(map[string]any{"excludeNamespaces": []string{"kube-system"}})); !ok {
		t.Errorf("excluded namespace: %s", out)
	}
	// Without the API server nothing can be proven.
	srv.Close()
	if out, ok := invoke(t, "ADD", "plain", "b", conf); ok || !strings.Contains(out, "cannot prove") {
		t.Errorf("API server down: ok=%v %s", ok, out)
	}
	os.Remove(e.access)
	if out, ok := invoke(t, "ADD", "plain", "b", conf); ok {
		t.Errorf("no access file: ok %s", out)
	}
	// DEL with no agent succeeds.
	if out, ok := invoke(t, "DEL", "mesh", "a", conf); !ok {
		t.Errorf("DEL without agent: %s", out)
	}
	// Not chained: refused.
	bare, _ := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "x", "type": Name, "agentSocket": e.socket})
	if out, ok := invoke(t, "ADD", "mesh", "a", bare); ok || !strings.Contains(out, "chained") {
		t.Errorf("unchained: ok=%v %s", ok, out)
	}
}

type agent struct {
	err error
	got []*cniapi.AddRequest
}

func (a *agent) Add(_ context.Context, req *cniapi.AddRequest) (*cniapi.AddResponse, error) {
	a.got = append(a.got, req)
	if a.err != nil {
		return nil, a.err
	}
	return &cniapi.AddResponse{Captured: true}, nil
}

func (a *agent) Del(context.Context, *cniapi.DelRequest) error { return a.err }

func TestAddWithAgent(t *testing.T) {
	e := newEnv(t)
	a := &agent{}
	ln, err := cniapi.Listen(e.socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: cniapi.Handle(a)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	out, ok := invoke(t, "ADD", "mesh", "a", e.conf(nil))
	if !ok || !strings.Contains(out, `"10.0.0.5/32"`) {
		t.Fatalf("ADD: %v %s", ok, out)
	}
	got := a.got[0]
	if got.PodNamespace != "mesh" || got.PodName != "a" || got.PodUID != "uid-a" || got.ContainerID != "c1" ||
		got.NetNS != "/run/netns/x" || got.IfName != "eth0" || len(got.IPs) != 1 || got.IPs[0].String() != "10.0.0.5" {
		t.Fatalf("agent got %+v", got)
	}
	a.err = errors.New("membership map full")
	if out, ok := invoke(t, "ADD", "mesh", "a", e.conf(nil)); ok || !strings.Contains(out, "membership map full") {
		t.Fatalf("agent refusal: ok=%v %s", ok, out)
	}
	if _, ok := invoke(t, "DEL", "mesh", "a", e.conf(nil)); ok {
		t.Fatal("DEL the agent failed succeeded")
	}
}
