// Package cniplugin is amber-cni, a chained CNI plugin that runs after the
// node's interface plugin and holds every pod's ADD until the agent has
// captured it, so that an enrolled pod never sends a packet before its
// capture is in place.
//
// Who decides: the agent, which reads the pod and its namespace live from
// the API server. When no agent answers on its socket (agent restarting or
// not yet started), the plugin may let a pod start only if it can prove
// the pod is outside the mesh. A namespace-level file cannot prove that:
// a pod label istio.io/dataplane-mode=ambient enrols a pod in any
// namespace, and the kubelet does not pass labels to CNI. So the plugin
// reads the pod and its namespace from the API server itself, with the
// access file the agent keeps up to date, and applies the same rules
// (package enrol). Namespaces excluded in the plugin's configuration need
// no proof. Anything else — no access file, API server unreachable, pod
// UID mismatch — fails the ADD, and the kubelet retries it.
//
// A pod started without the agent still gets the pod program on its veth
// (inbound capture of the node's captured pods depends on every veth
// running it), loaded from this binary into the pinned datapath.
//
// DEL with no agent succeeds: DEL must be idempotent, a sandbox being
// torn down sends nothing, and the agent prunes what the sandbox left
// once it runs again.
package cniplugin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/amber-mesh/amber/agent/cniapi"
	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/bpf"
)

// Name is the plugin's type in a conflist and its binary's name.
const Name = "amber-cni"

// Conf is the plugin's entry in the conflist.
type Conf struct {
	types.NetConf
	// AgentSocket is the agent's API. Zero means cniapi.DefaultSocket.
	AgentSocket string `json:"agentSocket,omitempty"`
	// APIAccessFile is the agent-written API-server access file. Zero
	// means cniapi.DefaultAPIAccess.
	APIAccessFile string `json:"apiAccessFile,omitempty"`
	// ExcludeNamespaces are never captured and need no agent.
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	// TimeoutSeconds bounds an ADD. Zero means 60.
	TimeoutSeconds int `json:"timeoutSeconds,omitempty"`
	// PinRoot is where the agent pins the datapath. Zero means
	// bpf.DefaultPinRoot.
	PinRoot string `json:"pinRoot,omitempty"`
}

// k8sArgs are the CNI_ARGS the kubelet's runtime passes; the field names
// are the keys (types.LoadArgs matches them by name).
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
}

// Main runs the plugin (the amber-cni binary's main).
func Main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, Status: cmdStatus}, version.All, "amber-cni: captures ambient pods before they start")
}

func parse(args *skel.CmdArgs) (*Conf, *k8sArgs, error) {
	conf := &Conf{}
	if err := json.Unmarshal(args.StdinData, conf); err != nil {
		return nil, nil, fmt.Errorf("parse config: %w", err)
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.NetConf); err != nil {
			return nil, nil, fmt.Errorf("parse prevResult: %w", err)
		}
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = cniapi.DefaultSocket
	}
	if conf.APIAccessFile == "" {
		conf.APIAccessFile = cniapi.DefaultAPIAccess
	}
	if conf.TimeoutSeconds <= 0 {
		conf.TimeoutSeconds = 60
	}
	if conf.PinRoot == "" {
		conf.PinRoot = bpf.DefaultPinRoot
	}
	ka := &k8sArgs{}
	if err := types.LoadArgs(args.Args, ka); err != nil {
		return nil, nil, fmt.Errorf("parse CNI_ARGS: %w", err)
	}
	return conf, ka, nil
}

func (c *Conf) excluded(ns string) bool {
	for _, x := range c.ExcludeNamespaces {
		if x == ns {
			return true
		}
	}
	return false
}

// passThrough prints the previous plugin's result: a chained plugin that
// changes nothing returns what it was given.
func passThrough(conf *Conf) error {
	if conf.PrevResult == nil {
		return types.PrintResult(&current.Result{CNIVersion: current.ImplementedSpecVersion}, conf.CNIVersion)
	}
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, ka, err := parse(args)
	if err != nil {
		return err
	}
	ns, name := string(ka.K8S_POD_NAMESPACE), string(ka.K8S_POD_NAME)
	if ns == "" || name == "" {
		// Not a Kubernetes pod (cnitool, a runtime's own networks).
		return passThrough(conf)
	}
	if conf.excluded(ns) {
		return passThrough(conf)
	}
	if conf.PrevResult == nil {
		return errors.New("amber-cni must be chained after the interface plugin (no prevResult)")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return fmt.Errorf("convert prevResult: %w", err)
	}
	req := &cniapi.AddRequest{
		ContainerID:  args.ContainerID,
		NetNS:        args.Netns,
		IfName:       args.IfName,
		PodNamespace: ns,
		PodName:      name,
		PodUID:       string(ka.K8S_POD_UID),
	}
	for _, ip := range prev.IPs {
		if a, ok := netip.AddrFromSlice(ip.Address.IP); ok {
			req.IPs = append(req.IPs, a.Unmap())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(conf.TimeoutSeconds)*time.Second)
	defer cancel()
	_, err = (&cniapi.Client{Socket: conf.AgentSocket}).Add(ctx, req)
	if errors.Is(err, cniapi.ErrUnreachable) {
		if err = withoutAgent(ctx, conf, req, err); err == nil {
			err = attachWithoutAgent(conf, prev)
		}
	}
	if err != nil {
		return err
	}
	return passThrough(conf)
}

// attachWithoutAgent runs the pod program on the veth of a pod that
// starts while the agent is down. The pod itself is outside the mesh, but
// inbound capture of the captured pods on this node needs every veth to
// run the program: without it, this pod's connections to them would reach
// them in plaintext, past the ztunnel's policy. The program comes from
// this binary; the agent swaps its own in when it returns. A node with no
// pinned datapath has no captured pod and needs nothing.
func attachWithoutAgent(conf *Conf, prev *current.Result) error {
	ifaces, err := ebpf.LoadPinnedMap(filepath.Join(conf.PinRoot, "amber_ifaces"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("amber agent unreachable and the datapath cannot be opened: %w", err)
	}
	capacity := int(ifaces.MaxEntries())
	ifaces.Close()
	var veth string
	for _, i := range prev.Interfaces {
		if i.Sandbox == "" {
			veth = i.Name
		}
	}
	if veth == "" {
		return errors.New("amber agent unreachable and the previous plugin names no host-side interface to attach to")
	}
	link, err := net.InterfaceByName(veth)
	if err != nil {
		return fmt.Errorf("amber agent unreachable: host interface %s: %w", veth, err)
	}
	dp, err := bpf.Load(bpf.Config{PinRoot: conf.PinRoot, MaxPods: capacity})
	if err != nil {
		return fmt.Errorf("amber agent unreachable and the datapath cannot be loaded: %w", err)
	}
	defer dp.Close()
	if err := dp.Attach(link.Index, bpf.RolePod); err != nil {
		return fmt.Errorf("amber agent unreachable: %w", err)
	}
	return nil
}

// withoutAgent lets the pod start only if the API server shows it is
// outside the mesh.
func withoutAgent(ctx context.Context, conf *Conf, req *cniapi.AddRequest, agentErr error) error {
	refuse := func(why string, args ...any) error {
		return fmt.Errorf("pod %s/%s: %w, and amber-cni cannot prove the pod is outside the mesh (%s); refusing to start it uncaptured",
			req.PodNamespace, req.PodName, agentErr, fmt.Sprintf(why, args...))
	}
	access, err := cniapi.ReadAPIAccess(conf.APIAccessFile)
	if err != nil {
		return refuse("%v", err)
	}
	r, err := newReader(access)
	if err != nil {
		return refuse("%v", err)
	}
	pod, err := r.pod(ctx, req.PodNamespace, req.PodName)
	if err != nil {
		return refuse("%v", err)
	}
	if req.PodUID != "" && pod.UID != req.PodUID {
		return refuse("the API server's pod has UID %s, the sandbox's is %s", pod.UID, req.PodUID)
	}
	ns, err := r.namespace(ctx, req.PodNamespace)
	if err != nil {
		return refuse("%v", err)
	}
	dec := enrol.Rules{ExcludeNamespaces: conf.ExcludeNamespaces}.Decide(ns, pod)
	if dec.Enrolled {
		return fmt.Errorf("pod %s/%s is enrolled in the mesh (%s) and %w: not starting it uncaptured", req.PodNamespace, req.PodName, dec.Reason, agentErr)
	}
	fmt.Fprintf(os.Stderr, "amber-cni: agent unreachable; pod %s/%s is outside the mesh (%s), starting it uncaptured\n", req.PodNamespace, req.PodName, dec.Reason)
	return nil
}

func cmdDel(args *skel.CmdArgs) error {
	conf, ka, err := parse(args)
	if err != nil {
		return err
	}
	ns, name := string(ka.K8S_POD_NAMESPACE), string(ka.K8S_POD_NAME)
	if ns == "" || name == "" || conf.excluded(ns) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(conf.TimeoutSeconds)*time.Second)
	defer cancel()
	err = (&cniapi.Client{Socket: conf.AgentSocket}).Del(ctx, &cniapi.DelRequest{
		ContainerID: args.ContainerID, PodNamespace: ns, PodName: name, PodUID: string(ka.K8S_POD_UID),
	})
	if errors.Is(err, cniapi.ErrUnreachable) {
		return nil
	}
	return err
}

// cmdCheck has nothing of its own to verify: the agent's reconciliation
// keeps capture in place for as long as the pod is enrolled.
func cmdCheck(args *skel.CmdArgs) error {
	_, _, err := parse(args)
	return err
}

// cmdStatus reports readiness for new ADDs: without an agent, an ADD
// can still succeed for pods outside the mesh, so the plugin is ready.
func cmdStatus(args *skel.CmdArgs) error {
	_, _, err := parse(args)
	return err
}

// reader reads single pods and namespaces from the API server with
// net/http, so that the plugin stays small (no client-go in a binary
// exec'd for every pod).
type reader struct {
	server *url.URL
	token  string
	hc     *http.Client
}

func newReader(a cniapi.APIAccess) (*reader, error) {
	u, err := url.Parse(a.Server)
	if err != nil {
		return nil, fmt.Errorf("api server url: %w", err)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if len(a.CAData) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(a.CAData) {
			return nil, errors.New("api access: no certificate in caData")
		}
		tc.RootCAs = pool
	}
	if len(a.CertData) > 0 {
		cert, err := tls.X509KeyPair(a.CertData, a.KeyData)
		if err != nil {
			return nil, fmt.Errorf("api access client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return &reader{server: u, token: a.Token, hc: &http.Client{
		Transport: &http.Transport{TLSClientConfig: tc, Proxy: nil},
		Timeout:   10 * time.Second,
	}}, nil
}

type objectMeta struct {
	Name            string            `json:"name"`
	Namespace       string            `json:"namespace"`
	UID             string            `json:"uid"`
	ResourceVersion string            `json:"resourceVersion"`
	Labels          map[string]string `json:"labels"`
	Annotations     map[string]string `json:"annotations"`
}

func (r *reader) get(ctx context.Context, path string, v any) error {
	u := *r.server
	u.Path = path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	if r.token != "" {
		req.Header.Set("Authorization", "Bearer "+r.token)
	}
	resp, err := r.hc.Do(req)
	if err != nil {
		return fmt.Errorf("get %s: %w", path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return fmt.Errorf("get %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("get %s: status %d", path, resp.StatusCode)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("get %s: %w", path, err)
	}
	return nil
}

func (r *reader) pod(ctx context.Context, ns, name string) (*enrol.Pod, error) {
	var obj struct {
		Metadata objectMeta `json:"metadata"`
		Spec     struct {
			NodeName    string `json:"nodeName"`
			HostNetwork bool   `json:"hostNetwork"`
		} `json:"spec"`
		Status struct {
			Phase string `json:"phase"`
		} `json:"status"`
	}
	if err := r.get(ctx, "/api/v1/namespaces/"+url.PathEscape(ns)+"/pods/"+url.PathEscape(name), &obj); err != nil {
		return nil, err
	}
	m := obj.Metadata
	return &enrol.Pod{
		UID: m.UID, ResourceVersion: m.ResourceVersion, Namespace: m.Namespace, Name: m.Name,
		NodeName: obj.Spec.NodeName, Labels: m.Labels, Annotations: m.Annotations,
		HostNetwork: obj.Spec.HostNetwork, Phase: enrol.Phase(obj.Status.Phase),
	}, nil
}

func (r *reader) namespace(ctx context.Context, name string) (*enrol.Namespace, error) {
	var obj struct {
		Metadata objectMeta `json:"metadata"`
	}
	if err := r.get(ctx, "/api/v1/namespaces/"+url.PathEscape(name), &obj); err != nil {
		return nil, err
	}
	return &enrol.Namespace{Name: obj.Metadata.Name, Labels: obj.Metadata.Labels}, nil
}
