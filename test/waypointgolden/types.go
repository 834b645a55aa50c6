package waypointgolden

// The message types istiod puts inside Anys of a waypoint's configuration,
// linked so that protojson can render and parse them.
import _ "github.com/amber-mesh/amber/waypoint/envoytypes"
