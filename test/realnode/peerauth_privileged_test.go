package realnode_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/realnode"
)

// plainNS is a namespace outside the mesh: its sleep connects to meshed
// pods in plaintext (the destination's ztunnel takes it on 15006).
const plainNS = "plain"

// peerAuthentication applies Istio's PeerAuthentication through istiod:
// namespace-wide STRICT refuses sleep from plainNS (plaintext) and admits
// sleep from the mesh (mTLS); a workload PeerAuthentication that makes
// url's port PERMISSIVE admits plaintext again. Both are removed at the
// end.
func peerAuthentication(t *testing.T, ctx context.Context, c *cluster.Cluster, url string) {
	tg := realnode.HostTarget(c)
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: plainNS}}, metav1.CreateOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatal(err)
	}
	if err := tg.Apply(ctx, "plain.yaml", realnode.WorkloadsYAML(plainNS)); err != nil {
		t.Fatal(err)
	}
	if err := tg.WaitRollout(ctx, plainNS, realnode.Sleep); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "plaintext sleep → productpage before STRICT", func() error {
		if out, ok := curlIn(ctx, tg, plainNS, realnode.Sleep, url); !ok {
			return errors.New(out)
		}
		return nil
	})
	if p := podOf(t, ctx, tg, plainNS, realnode.Sleep); captured(t, p.Status.PodIP) {
		t.Fatalf("the plaintext client %s is captured", p.Status.PodIP)
	}
	t.Cleanup(func() {
		for _, name := range []string{"default", realnode.Productpage + "-port-" + strconv.Itoa(images.EchoPort)} {
			c.Kubectl(context.Background(), "-n", ns, "delete", "peerauthentication", name, "--ignore-not-found")
		}
	})

	since := time.Now().Add(-time.Second)
	if err := tg.Apply(ctx, "peerauth.yaml", realnode.PeerAuthenticationYAML(ns)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "plaintext refused under STRICT", func() error { return refusedIn(ctx, tg, plainNS, realnode.Sleep, url) })
	curl(t, ctx, c, realnode.Sleep, url, true)
	// The refusal is the converted PeerAuthentication's, named in the
	// destination's access log.
	waitFor(t, ctx, "the STRICT refusal in the access log", func() error {
		logs, err := realnode.ZtunnelLogs(ctx, c, since)
		if err != nil {
			return err
		}
		if _, ok := realnode.FindLogLine(logs, func(r realnode.LogRecord) bool {
			return r["reporter"] == "destination" && strings.Contains(r["error"], "denied by policy") && r["src.identity"] == ""
		}); !ok {
			return errors.New("no plaintext connection denied by policy in the ztunnel's log")
		}
		return nil
	})

	if err := tg.Apply(ctx, "peerauth-port.yaml", realnode.PortPermissiveYAML(ns, realnode.Productpage, images.EchoPort)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "plaintext admitted on the PERMISSIVE port", func() error {
		if out, ok := curlIn(ctx, tg, plainNS, realnode.Sleep, url); !ok {
			return errors.New(out)
		}
		return nil
	})
	curl(t, ctx, c, realnode.Sleep, url, true)
}
