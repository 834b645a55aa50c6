package main

import (
	"github.com/amber-mesh/amber/waypoint"
	"github.com/amber-mesh/amber/waypoint/proxy"
)

// newDataPath builds the waypoint's data path on the registry, store and
// certificate waypoint.Run set up.
func newDataPath(c waypoint.DataPathConfig) (waypoint.DataPath, error) {
	return proxy.New(proxy.Config{Store: c.Store, Certs: c.Certs, Identity: c.Identity, Metrics: c.Metrics.Registry(), Logger: c.Logger, Self: c.Self()})
}
