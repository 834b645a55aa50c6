package realnode

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/amber-mesh/amber/test/images"
)

// SleeperPod is a pod named name in ns that only sleeps, as service
// account sa, labelled churn=true and stopped within a second: what the
// churn test and amber-bench create by the hundred.
func SleeperPod(ns, name, sa string) *corev1.Pod {
	grace := int64(1)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"churn": "true"}},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{Name: "sleep", Image: images.Curl.Ref, ImagePullPolicy: corev1.PullNever,
				Args: []string{"-sleep"}}},
		},
	}
}

// WaitCaptured waits for the address of pod name in ns to be in this
// node's membership map, and returns it with the time since created.
func WaitCaptured(ctx context.Context, client kubernetes.Interface, ns, name string, created time.Time) (string, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		p, err := client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil && p.Status.PodIP != "" {
			if ok, err := Captured(p.Status.PodIP); err == nil && ok {
				return p.Status.PodIP, time.Since(created), nil
			}
		}
		select {
		case <-ctx.Done():
			return "", 0, fmt.Errorf("not captured: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
