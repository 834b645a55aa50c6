package main

import "github.com/amber-mesh/amber/waypoint"

// newDataPath builds the data path, waypoint/proxy, which is written in
// parallel with the control side. Until it is merged the command has none
// and exits with waypoint.ErrNoDataPath; at the merge this becomes:
//
//	func newDataPath(c waypoint.DataPathConfig) (waypoint.DataPath, error) {
//		return proxy.New(proxy.Config{Store: c.Store, Certs: c.Certs, Identity: c.Identity, Metrics: c.Metrics, Logger: c.Logger})
//	}
var newDataPath func(waypoint.DataPathConfig) (waypoint.DataPath, error)
