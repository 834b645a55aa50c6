// Package server serves Istio's workload API over delta ADS from a local
// mesh file, so that local mode and tests run the same client code path as
// production does against istiod.
//
// Serve it on a listener (or Register it on a gRPC server of your own) and
// point an xds/client at it. Tests push arbitrary resources, even
// malformed ones, with Set and Delete; Clients reports what each client
// has acknowledged or rejected.
//
// # Mesh file
//
// The file is YAML. Unknown fields, duplicate keys and bad values are
// errors; the file is reloaded when it changes (or on Reload), and a file
// that fails to load leaves the served state as it was.
//
//	rootNamespace: istio-system        # policies here are mesh-wide; default istio-system
//
//	services:
//	  - name: productpage
//	    namespace: default             # default "default"
//	    hostname: productpage.default.svc.cluster.local   # default <name>.<namespace>.svc.cluster.local
//	    addresses: [10.96.0.10, "fd00:96::10"]            # VIPs; a CIDR is a VIP range
//	    network: ""                    # network of the addresses; default ""
//	    ports:
//	      - port: 9080
//	        targetPort: 9080           # default: port
//	        appProtocol: HTTP11        # optional: HTTP11, HTTP2, GRPC, TCP, TLS
//	    waypoint:                      # optional; all traffic to the service goes here
//	      address: 10.0.0.9            # or hostname: + namespace: (default: the service's)
//	      port: 15008                  # HBONE port; default 15008
//
//	workloads:
//	  - name: productpage-v1
//	    namespace: default             # default "default"
//	    uid: ""                        # default Kubernetes//Pod/<namespace>/<name>
//	    serviceAccount: bookinfo-productpage   # default "default"
//	    trustDomain: cluster.local     # default cluster.local
//	    addresses: [10.0.0.3]          # at least one address, or a hostname
//	    node: node-a
//	    protocol: HBONE                # HBONE (default) or TCP (not in the mesh)
//	    labels: {app: productpage, version: v1}
//	    services:
//	      - service: productpage       # a service above: name (same namespace) or namespace/name
//	        ports:                     # default: the service's own port mapping
//	          - port: 9080             # service port
//	            targetPort: 9080       # port on this workload; default: port
//	    waypoint: {address: 10.0.0.9}  # optional, as for services
//	    # also: network, hostname (a DNS-resolved workload), workloadName,
//	    # canonicalName (default: label app, else the name),
//	    # canonicalRevision (default: label version, else latest)
//	  - name: sleep
//	    serviceAccount: sleep
//	    addresses: [10.0.0.1]
//	    node: node-a
//
//	policies:                          # Istio AuthorizationPolicy, L4 view
//	  - name: productpage-viewer
//	    namespace: default             # default "default"
//	    selector:                      # optional: only workloads with these labels
//	      matchLabels: {app: productpage}
//	    scope: WorkloadSelector        # optional: Global, Namespace or WorkloadSelector;
//	                                   # default from selector / namespace, as istiod does
//	    action: ALLOW                  # ALLOW (default) or DENY
//	    dryRun: false                  # log matches without enforcing
//	    rules:
//	      - from:
//	          - source:
//	              principals: [cluster.local/ns/default/sa/sleep]
//	              # also notPrincipals, namespaces, notNamespaces,
//	              # serviceAccounts, notServiceAccounts ([namespace/]name),
//	              # ipBlocks, notIpBlocks
//	        to:
//	          - operation:
//	              ports: [9080]        # also notPorts
//	        when:
//	          - key: source.ip         # source.ip, source.namespace, source.principal,
//	            values: [10.0.0.0/8]   # destination.ip, destination.port; also notValues
//
// Principals and namespaces take Istio's wildcards: "*" (any value),
// "prefix*" and "*suffix".
//
// HTTP fields (methods, paths, hosts and their not* forms, requestPrincipals,
// remoteIpBlocks, and any other when key) cannot be enforced by a ztunnel.
// As istiod does, they fail closed: an ALLOW rule that uses them is dropped,
// so it never allows anything; in a DENY rule they are ignored, so the rule
// denies a superset of what it names. Each case is reported as a warning.
//
// Selector policies are listed in the authorization_policies of every
// workload in their namespace (or any workload, for the root namespace)
// whose labels match.
package server
