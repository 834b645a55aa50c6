package enrol

import "testing"

func TestDecide(t *testing.T) {
	ambient := map[string]string{DataplaneModeLabel: DataplaneModeAmbient}
	none := map[string]string{DataplaneModeLabel: DataplaneModeNone}
	other := map[string]string{"app": "x"}
	sidecar := map[string]string{SidecarStatusAnnotation: "{}"}
	for _, tc := range []struct {
		name     string
		ns       map[string]string
		nilNS    bool
		pod      map[string]string
		annots   map[string]string
		hostNet  bool
		podNS    string
		rules    Rules
		enrolled bool
		reason   Reason
	}{
		{name: "nothing labelled", ns: other, pod: other, reason: NotLabelled},
		{name: "namespace ambient", ns: ambient, pod: other, enrolled: true, reason: NamespaceOn},
		{name: "pod ambient", ns: other, pod: ambient, enrolled: true, reason: PodOn},
		{name: "both ambient", ns: ambient, pod: ambient, enrolled: true, reason: PodOn},
		{name: "namespace ambient, pod none", ns: ambient, pod: none, reason: OptedOut},
		{name: "namespace none, pod ambient", ns: none, pod: ambient, enrolled: true, reason: PodOn},
		{name: "pod none only", ns: other, pod: none, reason: NotLabelled},
		{name: "namespace ambient, hostNetwork", ns: ambient, pod: other, hostNet: true, reason: HostNetwork},
		{name: "pod ambient, hostNetwork", ns: other, pod: ambient, hostNet: true, reason: HostNetwork},
		{name: "namespace ambient, sidecar", ns: ambient, pod: other, annots: sidecar, reason: HasSidecar},
		{name: "unknown namespace, pod ambient", nilNS: true, pod: ambient, enrolled: true, reason: PodOn},
		{name: "unknown namespace, pod unlabelled", nilNS: true, pod: other, reason: NotLabelled},
		{name: "label value is case sensitive", ns: map[string]string{DataplaneModeLabel: "Ambient"}, pod: other, reason: NotLabelled},
		{name: "excluded namespace", ns: ambient, pod: ambient, podNS: "kube-system", rules: Rules{ExcludeNamespaces: []string{"kube-system"}}, reason: Excluded},
		{name: "exclusion of another namespace", ns: ambient, pod: other, podNS: "app", rules: Rules{ExcludeNamespaces: []string{"kube-system"}}, enrolled: true, reason: NamespaceOn},
	} {
		t.Run(tc.name, func(t *testing.T) {
			podNS := tc.podNS
			if podNS == "" {
				podNS = "app"
			}
			var ns *Namespace
			if !tc.nilNS {
				ns = &Namespace{Name: podNS, Labels: tc.ns}
			}
			p := &Pod{Namespace: podNS, Name: "p", Labels: tc.pod, Annotations: tc.annots, HostNetwork: tc.hostNet}
			got := tc.rules.Decide(ns, p)
			if got.Enrolled != tc.enrolled || got.Reason != tc.reason {
				t.Errorf("Decide = %+v, want enrolled=%v reason=%s", got, tc.enrolled, tc.reason)
			}
		})
	}
}

func TestPodPredicates(t *testing.T) {
	for _, ph := range []Phase{PhaseSucceeded, PhaseFailed} {
		if !(&Pod{Phase: ph}).Terminal() {
			t.Errorf("%s not terminal", ph)
		}
	}
	for _, ph := range []Phase{PhasePending, PhaseRunning, ""} {
		if (&Pod{Phase: ph}).Terminal() {
			t.Errorf("%q terminal", ph)
		}
	}
	if !(&Pod{Annotations: map[string]string{RedirectionAnnotation: RedirectionEnabled}}).Redirected() {
		t.Error("annotated pod not redirected")
	}
	if (&Pod{}).Redirected() {
		t.Error("bare pod redirected")
	}
}
