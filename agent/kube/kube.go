// Package kube is the agent's only contact with Kubernetes: it watches the
// node's pods and every namespace with client-go informers, turns them
// into the agent's own small structs, reads single objects live for the
// CNI path, and writes the redirection annotation and warning events.
package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/amber-mesh/amber/agent/cniapi"
	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/internal/logkey"
)

// Sink receives the converted view. capture.Controller is one.
type Sink interface {
	UpsertPod(*enrol.Pod)
	DeletePod(uid string)
	UpsertNamespace(*enrol.Namespace)
	DeleteNamespace(name string)
	// MarkSynced is called once, after every object of the initial lists
	// has been delivered.
	MarkSynced()
}

// Config configures a Client.
type Config struct {
	// Kubeconfig is a kubeconfig file. Zero means the in-cluster
	// configuration (service-account token and CA).
	Kubeconfig string
	// NodeName selects the pods watched (spec.nodeName). Required.
	NodeName string
	// Component is the event source. Zero means "amber-agent".
	Component string
	// LiveTimeout bounds each live read on the CNI path. Zero means 5 s.
	LiveTimeout time.Duration
	// QPS and Burst limit the client's request rate. Zero means 50 and
	// 100: each pod start costs two live reads and an annotation patch,
	// and client-go's own default (5/s) would hold a burst of pod starts
	// for seconds.
	QPS   float32
	Burst int
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Client is the agent's Kubernetes edge.
type Client struct {
	cfg    Config
	log    *slog.Logger
	cs     kubernetes.Interface
	rest   *rest.Config // nil with NewForClientset
	pods   cache.SharedIndexInformer
	nss    cache.SharedIndexInformer
	events chan *corev1.Event
}

// New builds a client from cfg.Kubeconfig (or the in-cluster config).
func New(cfg Config) (*Client, error) {
	var rc *rest.Config
	var err error
	if cfg.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	rc.UserAgent = "amber-agent"
	rc.QPS, rc.Burst = cfg.QPS, cfg.Burst
	if rc.QPS <= 0 {
		rc.QPS = 50
	}
	if rc.Burst <= 0 {
		rc.Burst = 100
	}
	// Protobuf halves the decode cost and memory of pod lists.
	rc.ContentType = "application/vnd.kubernetes.protobuf"
	rc.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	c, err := NewForClientset(cs, cfg)
	if err != nil {
		return nil, err
	}
	c.rest = rc
	return c, nil
}

// NewForClientset builds a client on an existing clientset (tests use
// client-go's fake).
func NewForClientset(cs kubernetes.Interface, cfg Config) (*Client, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("kube: NodeName is required")
	}
	if cfg.Component == "" {
		cfg.Component = "amber-agent"
	}
	if cfg.LiveTimeout <= 0 {
		cfg.LiveTimeout = 5 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	c := &Client{cfg: cfg, log: log, cs: cs, events: make(chan *corev1.Event, 256)}
	node := fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
	podFactory := informers.NewSharedInformerFactoryWithOptions(cs, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = node }))
	c.pods = podFactory.Core().V1().Pods().Informer()
	c.nss = informers.NewSharedInformerFactory(cs, 0).Core().V1().Namespaces().Informer()
	// The cache keeps what conversion reads and nothing else.
	c.pods.SetTransform(stripManagedFields)
	c.nss.SetTransform(stripManagedFields)
	return c, nil
}

func stripManagedFields(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

// Run starts the informers, feeds sink and sends events until ctx is
// done, and returns once all of that has stopped. List and watch errors are retried by the informers' reflectors
// with backoff; MarkSynced is called only after the initial lists of both
// pods and namespaces reached sink.
func (c *Client) Run(ctx context.Context, sink Sink) error {
	podReg, err := c.pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.onPod(sink, obj) },
		UpdateFunc: func(_, obj any) { c.onPod(sink, obj) },
		DeleteFunc: func(obj any) { c.onPodDelete(sink, obj) },
	})
	if err != nil {
		return err
	}
	nsReg, err := c.nss.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.onNamespace(sink, obj) },
		UpdateFunc: func(_, obj any) { c.onNamespace(sink, obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if ns, ok := obj.(*corev1.Namespace); ok {
				sink.DeleteNamespace(ns.Name)
			}
		},
	})
	if err != nil {
		return err
	}
	for _, inf := range []cache.SharedIndexInformer{c.pods, c.nss} {
		inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
			c.log.Warn("kubernetes watch failed; retrying with backoff", logkey.Error, err)
		})
	}
	// Everything started here ends with ctx, and Run returns after it.
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { c.pods.RunWithContext(ctx) })
	wg.Go(func() { c.nss.RunWithContext(ctx) })
	wg.Go(func() { c.sendEvents(ctx) })
	if cache.WaitForCacheSync(ctx.Done(), podReg.HasSynced, nsReg.HasSynced) {
		sink.MarkSynced()
	}
	<-ctx.Done()
	return ctx.Err()
}

func (c *Client) onPod(sink Sink, obj any) {
	p, ok := obj.(*corev1.Pod)
	if !ok || p.Spec.NodeName != c.cfg.NodeName {
		return
	}
	sink.UpsertPod(PodFromAPI(p))
}

func (c *Client) onPodDelete(sink Sink, obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if p, ok := obj.(*corev1.Pod); ok {
		sink.DeletePod(string(p.UID))
	}
}

func (c *Client) onNamespace(sink Sink, obj any) {
	if ns, ok := obj.(*corev1.Namespace); ok {
		sink.UpsertNamespace(NamespaceFromAPI(ns))
	}
}

// Pod reads a pod live (the CNI path must not decide on a stale label)
// and falls back to the informer's cache when the API server cannot be
// reached. A pod the API server says does not exist is an error.
func (c *Client) Pod(ctx context.Context, namespace, name string) (*enrol.Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.LiveTimeout)
	defer cancel()
	p, err := c.cs.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err == nil {
		return PodFromAPI(p), nil
	}
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
	}
	if obj, ok, _ := c.pods.GetStore().GetByKey(namespace + "/" + name); ok {
		c.log.Warn("live pod read failed; using the informer cache", "pod", namespace+"/"+name, logkey.Error, err)
		return PodFromAPI(obj.(*corev1.Pod)), nil
	}
	return nil, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
}

// Namespace is Pod for namespaces.
func (c *Client) Namespace(ctx context.Context, name string) (*enrol.Namespace, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.LiveTimeout)
	defer cancel()
	ns, err := c.cs.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err == nil {
		return NamespaceFromAPI(ns), nil
	}
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("get namespace %s: %w", name, err)
	}
	if obj, ok, _ := c.nss.GetStore().GetByKey(name); ok {
		c.log.Warn("live namespace read failed; using the informer cache", "namespace", name, logkey.Error, err)
		return NamespaceFromAPI(obj.(*corev1.Namespace)), nil
	}
	return nil, fmt.Errorf("get namespace %s: %w", name, err)
}

// Annotate sets or removes ambient.istio.io/redirection. It patches the
// status subresource (pods/status may change metadata and is the lesser
// privilege, as istio-cni does), and includes the UID as a precondition
// so that a new pod reusing the name is never annotated for the old one.
func (c *Client) Annotate(ctx context.Context, p *enrol.Pod, on bool) error {
	var val any
	if on {
		val = enrol.RedirectionEnabled
	}
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{
			"uid":         p.UID,
			"annotations": map[string]any{enrol.RedirectionAnnotation: val},
		},
	})
	if err != nil {
		return err
	}
	_, err = c.cs.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
	if apierrors.IsNotFound(err) || (!on && apierrors.IsConflict(err)) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("annotate pod %s: %w", p.Key(), err)
	}
	return nil
}

// Warn records a warning event on the pod. Events are sent in the
// background and dropped (with a log) when the API server is slower than
// failures arrive; they are a report, not state.
func (c *Client) Warn(p *enrol.Pod, reason, message string) {
	now := metav1.Now()
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: p.Name + ".", Namespace: p.Namespace},
		InvolvedObject: corev1.ObjectReference{
			Kind: "Pod", APIVersion: "v1", Namespace: p.Namespace, Name: p.Name, UID: types.UID(p.UID),
		},
		Reason:              reason,
		Message:             message,
		Type:                corev1.EventTypeWarning,
		Source:              corev1.EventSource{Component: c.cfg.Component, Host: c.cfg.NodeName},
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		ReportingController: c.cfg.Component,
		ReportingInstance:   c.cfg.Component + "-" + c.cfg.NodeName,
	}
	select {
	case c.events <- ev:
	default:
		c.log.Warn("event dropped", "pod", p.Key(), "reason", reason)
	}
}

// sendEvents creates events one by one: only "create" is needed, so the
// agent's role needs no event patch or update.
func (c *Client) sendEvents(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-c.events:
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := c.cs.CoreV1().Events(ev.Namespace).Create(cctx, ev, metav1.CreateOptions{})
			cancel()
			if err != nil && ctx.Err() == nil {
				c.log.Warn("create event", "pod", ev.InvolvedObject.Namespace+"/"+ev.InvolvedObject.Name, "reason", ev.Reason, logkey.Error, err)
			}
		}
	}
}

// APIAccess returns the credentials the CNI plugin may use to read pods
// and namespaces when the agent is down: this client's server, CA and
// token or client certificate.
func (c *Client) APIAccess() (cniapi.APIAccess, error) {
	rc := c.rest
	if rc == nil {
		return cniapi.APIAccess{}, errors.New("kube: no REST config (fake clientset)")
	}
	a := cniapi.APIAccess{Server: rc.Host, Token: rc.BearerToken, Written: time.Now().UTC()}
	var err error
	read := func(data []byte, file string) []byte {
		if len(data) > 0 || file == "" || err != nil {
			return data
		}
		data, err = os.ReadFile(file)
		return data
	}
	a.CAData = read(rc.CAData, rc.CAFile)
	a.CertData = read(rc.CertData, rc.CertFile)
	a.KeyData = read(rc.KeyData, rc.KeyFile)
	if a.Token == "" && rc.BearerTokenFile != "" && err == nil {
		var t []byte
		t, err = os.ReadFile(rc.BearerTokenFile)
		a.Token = string(t)
	}
	if err != nil {
		return cniapi.APIAccess{}, fmt.Errorf("api access for the cni plugin: %w", err)
	}
	return a, nil
}

// Uninstalling reports whether this agent pod stops because amber is
// being removed from the node rather than restarted or upgraded: its
// owning DaemonSet is gone or being deleted (the test istio-cni uses).
// On a restart the CNI plugin must stay in place so that new pods wait
// for the next agent instead of starting uncaptured.
//
// `helm uninstall` and `kubectl delete -k` delete the service account and
// its RBAC together with the DaemonSet, before the pods stop: an agent
// whose credentials worked when it started and are now refused (401 or
// 403) is being removed too.
func (c *Client) Uninstalling(ctx context.Context, namespace, podName string) (bool, error) {
	pod, err := c.cs.CoreV1().Pods(namespace).Get(ctx, podName, metav1.GetOptions{})
	if apierrors.IsUnauthorized(err) || apierrors.IsForbidden(err) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("get own pod: %w", err)
	}
	var ds string
	for _, o := range pod.OwnerReferences {
		if o.Kind == "DaemonSet" {
			ds = o.Name
		}
	}
	if ds == "" {
		return false, nil
	}
	var d *appsv1.DaemonSet
	d, err = c.cs.AppsV1().DaemonSets(namespace).Get(ctx, ds, metav1.GetOptions{})
	if apierrors.IsNotFound(err) || apierrors.IsUnauthorized(err) || apierrors.IsForbidden(err) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("get own daemonset: %w", err)
	}
	return d.DeletionTimestamp != nil, nil
}
