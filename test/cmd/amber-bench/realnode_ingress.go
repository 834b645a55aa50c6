package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/realnode"
)

// ingressPath is what the ingress stage asks for: a path Istio's
// bookinfo-gateway.yaml routes (prefix /api/v1/products) that productpage
// answers without calling a backend, so the measurement is the gateway's
// hop and the HBONE hop to productpage, not Bookinfo's page.
const ingressPath = "/api/v1/products"

// ingressStage installs the walkthrough's istio-ingressgateway (Istio's
// istio-ingress chart with amber's image: amber-waypoint as the gateway,
// realnode.IngressHelmArgs) and Istio's bookinfo-gateway.yaml, measures
// sleep → productpage GET /api/v1/products directly at b.latRate, then the
// same through the gateway at b.latRate and each of b.rates, metering the
// gateway pod's process (RSS, CPU), and uninstalls the gateway.
func ingressStage(b *nodeBench) (err error) {
	if err := b.a.InstallIngress(b.ctx); err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(b.ctx), 3*time.Minute)
		defer cancel()
		_, derr := b.c.Kubectl(cctx, "delete", "--ignore-not-found", "-f", filepath.Join(b.c.Istiod.BinDir, realnode.BookinfoGatewaySample))
		err = errors.Join(err, derr, b.a.UninstallIngress(cctx))
	}()
	if err := b.tg.WaitRollout(b.ctx, realnode.Namespace, realnode.IngressGateway); err != nil {
		return err
	}
	if out, err := b.c.Kubectl(b.ctx, "apply", "-f", filepath.Join(b.c.Istiod.BinDir, realnode.BookinfoGatewaySample)); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	svc, err := b.c.Client.CoreV1().Services(realnode.Namespace).Get(b.ctx, realnode.IngressGateway, metav1.GetOptions{})
	if err != nil {
		return err
	}
	url := "http://" + net.JoinHostPort(svc.Spec.ClusterIP, "80") + ingressPath
	host := realnode.IngressGateway + "." + realnode.Namespace
	if err := realnode.Retry(b.ctx, 2*time.Minute, func() error { return getOK(b.ctx, b.sleep, url, host) }); err != nil {
		return fmt.Errorf("GET %s through the gateway: %w", ingressPath, err)
	}
	pp, err := b.c.Client.CoreV1().Services("default").Get(b.ctx, realnode.BookinfoProductpage, metav1.GetOptions{})
	if err != nil {
		return err
	}
	port := strconv.Itoa(int(pp.Spec.Ports[0].Port))
	direct, err := b.measureRate(b.sleep, "http://"+net.JoinHostPort(pp.Spec.ClusterIP, port)+ingressPath, realnode.BookinfoProductpage+":"+port, b.latRate, nil)
	if err != nil {
		return err
	}
	b.record("ingress", fmt.Sprintf("sleep → productpage directly, %d GET/s", b.latRate), "%s", direct)

	pid, err := b.podProcess(realnode.Namespace, realnode.IngressSelector, realnode.GatewayCommand[0])
	if err != nil {
		return err
	}
	return b.meterProxy("ingress", "gateway", "sleep → gateway → productpage", pid, url, host, direct)
}
