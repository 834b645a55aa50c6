package kube

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/internal/testutil"
)

func TestPodFromAPI(t *testing.T) {
	created := metav1.NewTime(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	del := metav1.Now()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web", Namespace: "app", UID: "u1", ResourceVersion: "42",
			Labels:            map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeAmbient},
			Annotations:       map[string]string{"a": "b"},
			CreationTimestamp: created, DeletionTimestamp: &del,
		},
		Spec: corev1.PodSpec{NodeName: "n1", HostNetwork: true},
		Status: corev1.PodStatus{
			Phase:  corev1.PodRunning,
			PodIP:  "10.0.0.1",
			PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}, {IP: "fd00::1"}, {IP: "bogus"}},
		},
	}
	got := PodFromAPI(p)
	want := &enrol.Pod{
		UID: "u1", ResourceVersion: "42", Namespace: "app", Name: "web", NodeName: "n1",
		Labels: p.Labels, Annotations: p.Annotations, HostNetwork: true, Phase: enrol.PhaseRunning,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")}, Created: created.Time, Deleting: true,
	}
	if got.UID != want.UID || got.ResourceVersion != want.ResourceVersion || got.Namespace != want.Namespace ||
		got.Name != want.Name || got.NodeName != want.NodeName || !got.HostNetwork || got.Phase != want.Phase ||
		!slices.Equal(got.IPs, want.IPs) || !got.Created.Equal(want.Created) || !got.Deleting ||
		got.Labels[enrol.DataplaneModeLabel] != enrol.DataplaneModeAmbient || got.Annotations["a"] != "b" {
		t.Fatalf("PodFromAPI = %+v\nwant %+v", got, want)
	}

	// Only status.podIP (old API servers, single stack).
	p.Status.PodIPs = nil
	if got := PodFromAPI(p); !slices.Equal(got.IPs, want.IPs[:1]) {
		t.Fatalf("podIP only: %v", got.IPs)
	}
	// No IP yet.
	p.Status.PodIP = ""
	if got := PodFromAPI(p); len(got.IPs) != 0 {
		t.Fatalf("no IP: %v", got.IPs)
	}
	ns := NamespaceFromAPI(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app", Labels: map[string]string{"x": "y"}}})
	if ns.Name != "app" || ns.Labels["x"] != "y" {
		t.Fatalf("NamespaceFromAPI = %+v", ns)
	}
}

// recorder is a Sink that keeps the latest view.
type recorder struct {
	mu     sync.Mutex
	pods   map[string]*enrol.Pod
	nss    map[string]*enrol.Namespace
	synced bool
	// podsAtSync is how many pods had arrived when MarkSynced was called.
	podsAtSync int
}

func (r *recorder) UpsertPod(p *enrol.Pod) { r.mu.Lock(); r.pods[p.UID] = p; r.mu.Unlock() }
func (r *recorder) DeletePod(uid string)   { r.mu.Lock(); delete(r.pods, uid); r.mu.Unlock() }
func (r *recorder) UpsertNamespace(ns *enrol.Namespace) {
	r.mu.Lock()
	r.nss[ns.Name] = ns
	r.mu.Unlock()
}
func (r *recorder) DeleteNamespace(n string) { r.mu.Lock(); delete(r.nss, n); r.mu.Unlock() }
func (r *recorder) MarkSynced() {
	r.mu.Lock()
	r.synced = true
	r.podsAtSync = len(r.pods)
	r.mu.Unlock()
}

func (r *recorder) enrolled(uid string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.pods[uid]
	return p != nil && enrol.Decide(r.nss[p.Namespace], p).Enrolled
}

func apiPod(name, ns, node string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID("uid-" + name), Labels: labels},
		Spec:       corev1.PodSpec{NodeName: node},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}}},
	}
}

func run(t *testing.T, cs *fake.Clientset) (*Client, *recorder) {
	t.Helper()
	c, err := NewForClientset(cs, Config{NodeName: "n1", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{pods: map[string]*enrol.Pod{}, nss: map[string]*enrol.Namespace{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx, r) }()
	t.Cleanup(func() { cancel(); <-done })
	testutil.Eventually(t, "synced", func() bool { r.mu.Lock(); defer r.mu.Unlock(); return r.synced })
	return c, r
}

func TestWatchNodePodsAndLabels(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset(
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app"}},
		apiPod("a", "app", "n1", nil),
		apiPod("b", "app", "n1", nil),
		apiPod("elsewhere", "app", "n2", nil),
	)
	_, r := run(t, cs)
	r.mu.Lock()
	if r.podsAtSync != 2 {
		t.Errorf("MarkSynced after %d pods, want the 2 of this node", r.podsAtSync)
	}
	if _, ok := r.pods["uid-elsewhere"]; ok {
		t.Error("another node's pod delivered")
	}
	r.mu.Unlock()
	if r.enrolled("uid-a") {
		t.Fatal("enrolled without labels")
	}

	// Namespace label on, then off.
	ns, _ := cs.CoreV1().Namespaces().Get(ctx, "app", metav1.GetOptions{})
	ns.Labels = map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeAmbient}
	cs.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	testutil.Eventually(t, "namespace label seen", func() bool { return r.enrolled("uid-a") && r.enrolled("uid-b") })
	ns.Labels = nil
	cs.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	testutil.Eventually(t, "namespace label removal seen", func() bool { return !r.enrolled("uid-a") })

	// Pod label on, then opted out in an enrolled namespace.
	p, _ := cs.CoreV1().Pods("app").Get(ctx, "a", metav1.GetOptions{})
	p.Labels = map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeAmbient}
	cs.CoreV1().Pods("app").Update(ctx, p, metav1.UpdateOptions{})
	testutil.Eventually(t, "pod label seen", func() bool { return r.enrolled("uid-a") && !r.enrolled("uid-b") })
	ns.Labels = map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeAmbient}
	cs.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	p.Labels = map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeNone}
	cs.CoreV1().Pods("app").Update(ctx, p, metav1.UpdateOptions{})
	testutil.Eventually(t, "opt-out seen", func() bool { return !r.enrolled("uid-a") && r.enrolled("uid-b") })

	// New pod, deleted pod.
	cs.CoreV1().Pods("app").Create(ctx, apiPod("c", "app", "n1", nil), metav1.CreateOptions{})
	testutil.Eventually(t, "new pod", func() bool { return r.enrolled("uid-c") })
	cs.CoreV1().Pods("app").Delete(ctx, "b", metav1.DeleteOptions{})
	testutil.Eventually(t, "deleted pod", func() bool { r.mu.Lock(); defer r.mu.Unlock(); return r.pods["uid-b"] == nil })
}

func TestLiveReadsAndReports(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset(
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app", Labels: map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeAmbient}}},
		apiPod("a", "app", "n1", nil),
	)
	c, _ := run(t, cs)
	p, err := c.Pod(ctx, "app", "a")
	if err != nil || p.UID != "uid-a" {
		t.Fatalf("Pod: %+v %v", p, err)
	}
	if _, err := c.Pod(ctx, "app", "missing"); err == nil {
		t.Fatal("missing pod read without error")
	}
	ns, err := c.Namespace(ctx, "app")
	if err != nil || ns.Labels[enrol.DataplaneModeLabel] != enrol.DataplaneModeAmbient {
		t.Fatalf("Namespace: %+v %v", ns, err)
	}

	if err := c.Annotate(ctx, p, true); err != nil {
		t.Fatal(err)
	}
	got, _ := cs.CoreV1().Pods("app").Get(ctx, "a", metav1.GetOptions{})
	if got.Annotations[enrol.RedirectionAnnotation] != enrol.RedirectionEnabled {
		t.Fatalf("annotations after enable: %v", got.Annotations)
	}
	if err := c.Annotate(ctx, p, false); err != nil {
		t.Fatal(err)
	}
	got, _ = cs.CoreV1().Pods("app").Get(ctx, "a", metav1.GetOptions{})
	if _, ok := got.Annotations[enrol.RedirectionAnnotation]; ok {
		t.Fatalf("annotation kept after disable: %v", got.Annotations)
	}
	// Annotating a deleted pod is not an error.
	if err := c.Annotate(ctx, &enrol.Pod{UID: "x", Namespace: "app", Name: "gone"}, true); err != nil {
		t.Fatalf("annotate gone pod: %v", err)
	}

	c.Warn(p, "MapFull", "no room")
	testutil.Eventually(t, "event created", func() bool {
		evs, _ := cs.CoreV1().Events("app").List(ctx, metav1.ListOptions{})
		for _, e := range evs.Items {
			if e.Reason == "MapFull" && e.Type == corev1.EventTypeWarning && e.InvolvedObject.UID == "uid-a" && e.Message == "no room" {
				return true
			}
		}
		return false
	})
}

func TestUninstalling(t *testing.T) {
	ctx := context.Background()
	owned := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "agent-x", Namespace: "amber",
		OwnerReferences: []metav1.OwnerReference{{Kind: "DaemonSet", Name: "amber-node", APIVersion: "apps/v1"}}}}
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "amber-node", Namespace: "amber"}}
	cs := fake.NewClientset(owned, ds)
	c, err := NewForClientset(cs, Config{NodeName: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	if u, err := c.Uninstalling(ctx, "amber", "agent-x"); err != nil || u {
		t.Fatalf("daemonset present: %v %v", u, err)
	}
	cs.AppsV1().DaemonSets("amber").Delete(ctx, "amber-node", metav1.DeleteOptions{})
	if u, err := c.Uninstalling(ctx, "amber", "agent-x"); err != nil || !u {
		t.Fatalf("daemonset gone: %v %v", u, err)
	}
	if _, err := c.Uninstalling(ctx, "amber", "nope"); err == nil {
		t.Fatal("own pod missing: no error")
	}
	// helm uninstall deletes the RBAC with the DaemonSet.
	cs.PrependReactor("get", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(corev1.Resource("pods"), "agent-x", errors.New("rbac gone"))
	})
	if u, err := c.Uninstalling(ctx, "amber", "agent-x"); err != nil || !u {
		t.Fatalf("credentials refused: %v %v", u, err)
	}
}

// Run returns only once everything it started has stopped: the informers
// and the event sender, here held in an event creation the API server has
// not answered yet.
func TestRunJoinsWhatItStarts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(
			&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app"}},
			apiPod("a", "app", "n1", nil),
		)
		creating, answer := make(chan struct{}), make(chan struct{})
		cs.PrependReactor("create", "events", func(k8stesting.Action) (bool, runtime.Object, error) {
			close(creating)
			<-answer
			return false, nil, nil
		})
		c, err := NewForClientset(cs, Config{NodeName: "n1", Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		r := &syncSignal{recorder: &recorder{pods: map[string]*enrol.Pod{}, nss: map[string]*enrol.Namespace{}}, synced: make(chan struct{})}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx, r) }()
		<-r.synced

		c.Warn(&enrol.Pod{UID: "uid-a", Namespace: "app", Name: "a"}, "MapFull", "no room")
		<-creating
		cancel()
		synctest.Wait()
		select {
		case err := <-done:
			t.Errorf("Run returned (%v) while its event sender was still in a request", err)
			close(answer)
			return
		default:
		}
		close(answer)
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v, want context.Canceled", err)
		}
		if !c.pods.IsStopped() || !c.nss.IsStopped() {
			t.Errorf("Run returned with informers running: pods stopped %v, namespaces stopped %v", c.pods.IsStopped(), c.nss.IsStopped())
		}
	})
}

// syncSignal is a recorder that says when it was marked synced.
type syncSignal struct {
	*recorder
	synced chan struct{}
}

func (s *syncSignal) MarkSynced() {
	s.recorder.MarkSynced()
	close(s.synced)
}
