# amber — eBPF data plane for Istio ambient mode.
# `make help` lists the targets.

GO        ?= go
BIN       := bin
GOFLAGS_T ?= -count=1

export CGO_ENABLED ?= 0

.PHONY: help
help: ## list targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## install the Debian packages builds and tests need (clang, bpftool, iproute2, ...)
	@bash hack/deps.sh

.PHONY: generate
generate: deps ## regenerate bpf2go output and workload API protos
	$(GO) generate ./...

.PHONY: check-generate
check-generate: deps ## regenerate and fail if the generated files in the tree differ
	@bash hack/check-generate.sh

.PHONY: demo
demo: deps ## Istio ambient's walkthrough on a real node with istiod and amber (Helm): Bookinfo, sleep/notsleep, mTLS, an L4 policy, amberctl, bpftool; the ingress steps through istio-ingressgateway (Istio's chart, amber's image); then a waypoint (amber-waypoint), an L7 policy, istio_requests_total, reviews 90/10 (DEMO_ARGS=-keep leaves it running)
	$(GO) run ./test/cmd/amber-demo $(DEMO_ARGS)

.PHONY: build
build: ## build amber-agent, amber-ztunnel, amber-waypoint, amber-cni and amberctl into bin/
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/...

.PHONY: vet
vet: ## gofmt and go vet
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed" >&2; exit 1; }
	$(GO) vet ./...

.PHONY: test
test: deps check-generate vet ## run every test tier this machine supports (CI runs this; with CI=true a skipped test fails it)
	@bash hack/kube-bins.sh all >/dev/null
	@bash hack/istiod-bin.sh pilot-discovery hbone-interop istioctl >/dev/null
	@bash hack/coredns.sh >/dev/null
	@bash hack/helm.sh >/dev/null
	PATH="$(CURDIR)/.cache/bin:$$PATH" GO="$(GO)" bash hack/go-test.sh $(GOFLAGS_T) -timeout 30m

.PHONY: test-kind
test-kind: ## the e2e suite on a kind cluster (your machine: Linux, rootful Docker or Podman, kind, internet): istiod from Istio's charts, amber's chart, the walkthrough and capture checks (KEEP=1 keeps the cluster, ISTIO_VERSION picks istiod)
	@bash hack/test-kind.sh

.PHONY: test-unit
test-unit: ## unprivileged tests only (privileged ones skip when not root)
	$(GO) test $(GOFLAGS_T) -short ./...

.PHONY: bench-datapath
bench-datapath: deps ## capture vs nftables TPROXY vs direct, as ratios (testbed), plus per-packet program cost
	$(GO) run ./test/cmd/amber-bench datapath -rounds 7
	$(GO) test -run '^$$' -bench 'BenchmarkProg' -benchtime 5x ./bpf/

.PHONY: bench-tunnel
bench-tunnel: deps ## amber HBONE tunnel vs plain, copying and AES-GCM proxy pairs, HAProxy's mTLS pair and Istio's Go HBONE pair, vs direct: throughput, latency, conn/s, CPU, memory (testbed; BENCH_ARGS="-profile DIR" adds profiles)
	$(GO) run ./test/cmd/amber-bench tunnel -rounds 5 $(BENCH_ARGS)

.PHONY: bench-waypoint
bench-waypoint: deps ## HTTP/1.1 1 KiB requests through amber-ztunnel + amber-waypoint vs a plain httputil.ReverseProxy, ztunnel only and direct: req/s, p50/p99, waypoint CPU and RSS (testbed + istiod; BENCH_ARGS adds flags, e.g. -rounds 5)
	$(GO) run ./test/cmd/amber-bench waypoint -rounds 3 $(BENCH_ARGS)

.PHONY: bench
bench: bench-datapath bench-tunnel bench-waypoint bench-agent ## every benchmark, each printing ratios against a baseline from the same run

.PHONY: bench-realnode
bench-realnode: deps ## on a real node (test/cluster, istiod, amber's chart): node and install times, pod create → captured under churn, a DaemonSet restart, the waypoint's and the ingress gateway's RSS and CPU at 100 and 1000 GET/s and their added p50/p99; absolute numbers of one run, not in `bench` (BENCH_ARGS adds flags, e.g. -stages waypoint or -stages ingress)
	PATH="$(CURDIR)/.cache/bin:$$PATH" $(GO) run ./test/cmd/amber-bench realnode $(BENCH_ARGS)

.PHONY: bench-agent
bench-agent: deps ## label → capture latency p50/p99 over 250 pods, agent CPU and RSS under churn (real API server + testbed; BENCH_ARGS adds flags, e.g. -pods 500)
	$(GO) run ./test/cmd/amber-bench agent $(BENCH_ARGS)

.PHONY: kube-bins
kube-bins: ## build etcd, kube-apiserver, kubectl into .cache/kube (KUBE_BINS="all" or names for more; cached)
	@bash hack/kube-bins.sh $(KUBE_BINS)

.PHONY: images
images: ## build amber's image and the test images (pause, echo, curl, Bookinfo) as docker archives into .cache/cluster/images, no container engine
	$(GO) run ./test/cmd/amber-cluster images

.PHONY: cluster-up
cluster-up: deps ## a real Kubernetes node with istiod on this machine (state in .cache/cluster/node; builds what is missing, then ≈ 15 s)
	@bash hack/kube-bins.sh all >/dev/null
	@bash hack/coredns.sh >/dev/null
	$(GO) run ./test/cmd/amber-cluster up

.PHONY: cluster-down
cluster-down: ## stop the node and remove everything it (and an amber installed on it) left on the host (idempotent, also after a crash)
	$(GO) run ./test/cmd/amber-cluster down
	$(GO) run ./cmd/amberctl uninstall

.PHONY: clean
clean: ## remove build output
	rm -rf $(BIN)
