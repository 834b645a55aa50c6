package config

import (
	"fmt"

	udpatypev1 "github.com/cncf/xds/go/udpa/type/v1"
	xdstypev3 "github.com/cncf/xds/go/xds/type/v3"
	"google.golang.org/protobuf/types/known/anypb"
	statsv1 "istio.io/api/envoy/extensions/stats"
)

// telemetryTypes are the TypedStruct type URLs istiod uses for filters
// that only feed telemetry (peer metadata exchange and discovery,
// pilot/pkg/xds/filters/filters.go): amber's data path finds peers in WDS
// and labels metrics itself.
var telemetryTypes = map[string]bool{
	"type.googleapis.com/io.istio.http.peer_metadata.Config":                            true,
	"type.googleapis.com/envoy.extensions.network_filters.peer_metadata.Config":         true,
	"type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange":            true,
	"type.googleapis.com/envoy.extensions.network_filters.peer_metadata.UpstreamConfig": true,
}

// telemetryTypedStruct accepts a TypedStruct (xds or udpa) of a
// telemetry-only type.
func telemetryTypedStruct(a *anypb.Any) error {
	var url string
	if typeName(a) == udpaStructType {
		ts, err := unpack[*udpatypev1.TypedStruct](a)
		if err != nil {
			return err
		}
		url = ts.GetTypeUrl()
	} else {
		ts, err := unpack[*xdstypev3.TypedStruct](a)
		if err != nil {
			return err
		}
		url = ts.GetTypeUrl()
	}
	if !telemetryTypes[url] {
		return fmt.Errorf("unsupported filter %s", url)
	}
	return nil
}

// Stats is what amber's metrics take from istio.stats: the reporter
// (SERVER_GATEWAY on a waypoint: reporter="waypoint") and whether the
// Host header may stand in for an unknown destination service. The rest
// (metric overrides from the Telemetry API) the allow-list counts as
// degraded.
type Stats struct {
	Reporter                  string
	DisableHostHeaderFallback bool
}

func statsConfig(a *anypb.Any) (*Stats, error) {
	c, err := unpack[*statsv1.PluginConfig](a)
	if err != nil {
		return nil, err
	}
	return &Stats{Reporter: c.GetReporter().String(), DisableHostHeaderFallback: c.GetDisableHostHeaderFallback()}, nil
}
