package config

import (
	"fmt"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/anypb"
)

// verdict is what the compiler does with a field that is set.
type verdict uint8

const (
	// compiled: the compiler reads it; its value is checked there.
	compiled verdict = iota + 1
	// inert: it changes nothing amber does (a name, a stat prefix, a
	// setting amber's own implementation already has); accepted silently.
	inert
	// telemetry: it only affects stats, logs or traces, which amber
	// produces its own way; accepted, counted as a degradation.
	telemetry
)

// fields is the allow-list: for each message type the fields that may be
// set, and what the compiler does with them. A set field missing here, or
// a message type missing here, is an error naming its path: the resource
// is NACKed and what it configures fails closed. Scalar well-known types
// (Duration, wrappers, Struct) are leaves whose presence their parent's
// entry governs. docs/waypoint.md has the table with the reasons.
var fields = map[protoreflect.FullName]map[protoreflect.Name]verdict{}

// anyTypes are the types an Any may hold; everything else is an
// unsupported extension.
var anyTypes = map[protoreflect.FullName]bool{}

// allow registers the allow-list entries of one message type.
func allow(msg protoreflect.FullName, v verdict, names ...protoreflect.Name) {
	m := fields[msg]
	if m == nil {
		m = map[protoreflect.Name]verdict{}
		fields[msg] = m
	}
	for _, n := range names {
		m[n] = v
	}
}

// leaves are well-known types checked as values, not walked.
var leaves = map[protoreflect.FullName]bool{
	"google.protobuf.Duration":    true,
	"google.protobuf.BoolValue":   true,
	"google.protobuf.UInt32Value": true,
	"google.protobuf.UInt64Value": true,
	"google.protobuf.Int32Value":  true,
	"google.protobuf.Int64Value":  true,
	"google.protobuf.DoubleValue": true,
	"google.protobuf.StringValue": true,
	"google.protobuf.Struct":      true,
	"google.protobuf.Value":       true,
	"google.protobuf.ListValue":   true,
	"google.protobuf.Empty":       true,
}

// filterParents are messages whose typed_config selects an extension: an
// unknown type there is reported at the parent's path, as an unsupported
// "filter", "transport socket" or "extension".
var filterParents = map[protoreflect.FullName]string{
	"envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter": "filter",
	"envoy.config.listener.v3.Filter":                                        "filter",
	"envoy.config.cluster.v3.Filter":                                         "filter",
	"envoy.config.listener.v3.ListenerFilter":                                "filter",
	"envoy.config.core.v3.TransportSocket":                                   "transport socket",
	"envoy.config.core.v3.TypedExtensionConfig":                              "extension",
	"xds.core.v3.TypedExtensionConfig":                                       "extension",
}

// Degradation is a setting amber accepted without honouring it.
type Degradation struct {
	// Path names the field ("listener main_internal: filter_chains[0]...").
	Path string
	// Reason is "telemetry" (stats, logs, traces amber produces its own
	// way) or "resilience" (outlier detection and the like, not
	// implemented).
	Reason string
}

func (v verdict) String() string {
	switch v {
	case compiled:
		return "compiled"
	case inert:
		return "inert"
	case telemetry:
		return "telemetry"
	case resilience:
		return "resilience"
	}
	return "refused"
}

// checker walks a resource against the allow-list.
type checker struct {
	problems []error
	degraded []Degradation
}

// check walks m, whose path is prefix. It reports every unsupported field
// and type, not just the first.
func (c *checker) check(prefix string, m proto.Message) {
	c.message(prefix, "", m.ProtoReflect())
}

func (c *checker) fail(path string, format string, args ...any) {
	c.problems = append(c.problems, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...)))
}

func join(prefix, path string) string {
	switch {
	case prefix == "":
		return path
	case path == "":
		return prefix
	}
	return prefix + ": " + path
}

func (c *checker) message(prefix, path string, m protoreflect.Message) {
	name := m.Descriptor().FullName()
	if leaves[name] {
		return
	}
	if len(m.GetUnknown()) > 0 {
		c.fail(join(prefix, path), "fields unknown to amber's protos (%s)", name)
	}
	if name == "google.protobuf.Any" {
		c.any(prefix, path, m.Interface().(*anypb.Any), "", "")
		return
	}
	allowed, ok := fields[name]
	if !ok {
		c.fail(join(prefix, path), "unsupported message %s", name)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		p := string(fd.Name())
		if path != "" {
			p = path + "." + p
		}
		switch v := allowed[fd.Name()]; v {
		case compiled, inert:
		case telemetry, resilience:
			c.degraded = append(c.degraded, Degradation{Path: join(prefix, p), Reason: v.String()})
			return true
		default:
			c.fail(join(prefix, p), "unsupported field of %s", name)
			return true
		}
		if fd.Kind() != protoreflect.MessageKind && fd.Kind() != protoreflect.GroupKind {
			return true
		}
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				c.value(prefix, fmt.Sprintf("%s[%d]", p, i), l.Get(i).Message(), name, fd)
			}
		case fd.IsMap():
			if fd.MapValue().Kind() == protoreflect.MessageKind {
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					c.value(prefix, fmt.Sprintf("%s[%s]", p, mapKey(k)), mv.Message(), name, fd)
					return true
				})
			}
		default:
			c.value(prefix, p, v.Message(), name, fd)
		}
		return true
	})
}

func mapKey(k protoreflect.MapKey) string {
	if s, ok := k.Interface().(string); ok {
		return s
	}
	return k.String()
}

// value walks a message-typed field value; an Any under a filter-like
// parent is reported as a filter.
func (c *checker) value(prefix, path string, m protoreflect.Message, parent protoreflect.FullName, fd protoreflect.FieldDescriptor) {
	if m.Descriptor().FullName() == "google.protobuf.Any" {
		filterPath, kind := "", filterParents[parent]
		if kind != "" {
			filterPath = strings.TrimSuffix(path, "."+string(fd.Name()))
		}
		c.any(prefix, path, m.Interface().(*anypb.Any), filterPath, kind)
		return
	}
	c.message(prefix, path, m)
}

// any unpacks an Any of an allowed type and walks it under the path
// "field(type)"; filterPath, when set, is where an unknown type is
// reported as an unsupported kind ("filter").
func (c *checker) any(prefix, path string, a *anypb.Any, filterPath, kind string) {
	tn := protoreflect.FullName(strings.TrimPrefix(a.GetTypeUrl(), "type.googleapis.com/"))
	if !anyTypes[tn] {
		if filterPath != "" {
			c.fail(join(prefix, filterPath), "unsupported %s %s", kind, a.GetTypeUrl())
		} else {
			c.fail(join(prefix, path), "unsupported type %s", a.GetTypeUrl())
		}
		return
	}
	mt, err := protoregistry.GlobalTypes.FindMessageByName(tn)
	if err != nil {
		c.fail(join(prefix, path), "type %s not linked into amber: %v", tn, err)
		return
	}
	inner := mt.New().Interface()
	if err := proto.Unmarshal(a.GetValue(), inner); err != nil {
		c.fail(join(prefix, path), "decode %s: %v", tn, err)
		return
	}
	if v, ok := inner.(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			c.fail(join(prefix, path), "invalid %s: %v", tn, err)
			return
		}
	}
	c.message(prefix, fmt.Sprintf("%s(%s)", path, tn), inner.ProtoReflect())
}

// unpack decodes an Any the checker accepted.
func unpack[M proto.Message](a *anypb.Any) (M, error) {
	var zero M
	m := zero.ProtoReflect().Type().New().Interface().(M)
	if err := a.UnmarshalTo(m); err != nil {
		return zero, err
	}
	return m, nil
}
