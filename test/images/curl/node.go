package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

func exitOn(err error) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "curl: %v\n", err)
		os.Exit(1)
	}
}

// resolveOverTCP resolves name with Go's resolver forced onto TCP, so the
// query is a TCP connection to the DNS server of the pod's resolv.conf
// (on the local cluster, CoreDNS as a process of the node).
func resolveOverTCP(name string, timeout time.Duration) error {
	d := &net.Dialer{}
	d.SetMultipathTCP(false)
	r := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	addrs, err := r.LookupHost(ctx, name)
	if err != nil {
		return fmt.Errorf("resolve %s over TCP: %w", name, err)
	}
	for _, a := range addrs {
		fmt.Println(a)
	}
	return nil
}

// whoAmI asks the API server who the pod's service-account token belongs
// to, through client-go's in-cluster configuration: the `kubernetes`
// Service's address from KUBERNETES_SERVICE_HOST and the mounted token.
func whoAmI(timeout time.Duration) error {
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return fmt.Errorf("in-cluster config: %w", err)
	}
	cfg.Timeout = timeout
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("self subject review via %s: %w", cfg.Host, err)
	}
	fmt.Println(r.Status.UserInfo.Username)
	return nil
}
