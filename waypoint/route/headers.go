package route

import (
	"fmt"
	"net/http"
	"net/textproto"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// AppendAction is a HeaderValueOption's append_action.
type AppendAction uint8

const (
	// AppendOrAdd appends a value, adding the header if absent (Envoy's
	// default, APPEND_IF_EXISTS_OR_ADD).
	AppendOrAdd AppendAction = iota
	// AddIfAbsent adds the header only if it is absent.
	AddIfAbsent
	// OverwriteOrAdd replaces every value, adding the header if absent.
	OverwriteOrAdd
	// OverwriteIfExists replaces the values only of a present header.
	OverwriteIfExists
)

// Mutation sets one header.
type Mutation struct {
	// Name is the canonical header name (net/http form).
	Name   string
	Value  string
	Action AppendAction
	// KeepEmpty adds the header even with an empty value; Envoy skips it
	// otherwise.
	KeepEmpty bool
}

// Mutations are one level's headers_to_add and headers_to_remove. Envoy
// removes first, then adds in order (router/header_parser.cc). The zero
// value and nil change nothing.
type Mutations struct {
	Remove []string // canonical names
	Add    []Mutation
}

func newMutations(add []*corev3.HeaderValueOption, remove []string) (*Mutations, error) {
	if len(add) == 0 && len(remove) == 0 {
		return nil, nil
	}
	m := &Mutations{}
	for _, r := range remove {
		if err := checkMutable(r); err != nil {
			return nil, fmt.Errorf("remove %q: %w", r, err)
		}
		m.Remove = append(m.Remove, textproto.CanonicalMIMEHeaderKey(r))
	}
	for i, o := range add {
		name := o.GetHeader().GetKey()
		if err := checkMutable(name); err != nil {
			return nil, fmt.Errorf("[%d] %q: %w", i, name, err)
		}
		v := o.GetHeader().GetValue()
		if len(o.GetHeader().GetRawValue()) > 0 {
			v = string(o.GetHeader().GetRawValue())
		}
		lit, err := literal(v)
		if err != nil {
			return nil, fmt.Errorf("[%d] %q: %w", i, name, err)
		}
		mu := Mutation{Name: textproto.CanonicalMIMEHeaderKey(name), Value: lit, KeepEmpty: o.GetKeepEmptyValue()}
		switch {
		case o.GetAppend() != nil:
			// The deprecated bool wins when set, as in Envoy.
			if o.GetAppend().GetValue() {
				mu.Action = AppendOrAdd
			} else {
				mu.Action = OverwriteOrAdd
			}
		default:
			switch o.GetAppendAction() {
			case corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD:
				mu.Action = AppendOrAdd
			case corev3.HeaderValueOption_ADD_IF_ABSENT:
				mu.Action = AddIfAbsent
			case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
				mu.Action = OverwriteOrAdd
			case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:
				mu.Action = OverwriteIfExists
			default:
				return nil, fmt.Errorf("[%d] append_action %v: %w", i, o.GetAppendAction(), ErrUnsupported)
			}
		}
		m.Add = append(m.Add, mu)
	}
	return m, nil
}

// checkMutable refuses what a header mutation may not touch: pseudo-headers
// and Host (Envoy refuses them too; istiod turns a Host change into a
// host rewrite).
func checkMutable(name string) error {
	n := strings.ToLower(name)
	if n == "" || strings.HasPrefix(n, ":") || n == "host" {
		return fmt.Errorf("header mutation of %q: %w", name, ErrUnsupported)
	}
	return nil
}

// literal resolves Envoy's format escapes in a header value: "%%" is a
// literal '%'; any other %COMMAND% (request or connection data) is not
// implemented.
func literal(v string) (string, error) {
	if !strings.Contains(v, "%") {
		return v, nil
	}
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		if v[i] != '%' {
			b.WriteByte(v[i])
			continue
		}
		if i+1 < len(v) && v[i+1] == '%' {
			b.WriteByte('%')
			i++
			continue
		}
		return "", fmt.Errorf("header value %q: format command: %w", v, ErrUnsupported)
	}
	return b.String(), nil
}

// Apply mutates h; nil m does nothing.
func (m *Mutations) Apply(h http.Header) {
	if m == nil {
		return
	}
	for _, r := range m.Remove {
		delete(h, r)
	}
	for _, a := range m.Add {
		if a.Value == "" && !a.KeepEmpty {
			continue
		}
		_, present := h[a.Name]
		switch a.Action {
		case AppendOrAdd:
			h[a.Name] = append(h[a.Name], a.Value)
		case AddIfAbsent:
			if !present {
				h[a.Name] = []string{a.Value}
			}
		case OverwriteOrAdd:
			h[a.Name] = []string{a.Value}
		case OverwriteIfExists:
			if present {
				h[a.Name] = []string{a.Value}
			}
		}
	}
}
