// Package promtext reads the Prometheus text exposition format that
// amber's processes and istiod serve, for tests and benchmarks that assert
// on metrics as a scraper sees them.
package promtext

import (
	"bufio"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// Sample is one sample of a Prometheus text exposition.
type Sample struct {
	Name   string
	Labels map[string]string
	Value  float64
}

// Parse reads a text exposition and returns its samples whose name is in
// names (all when names is empty). Label values keep their escapes.
func Parse(r io.Reader, names ...string) ([]Sample, error) {
	var out []Sample
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, "{")
		labels := map[string]string{}
		var value string
		if rest != "" {
			body, v, ok := strings.Cut(rest, "} ")
			if !ok {
				return nil, fmt.Errorf("metrics: bad line %q", line)
			}
			value = v
			for body != "" {
				k, after, ok := strings.Cut(body, `="`)
				if !ok {
					return nil, fmt.Errorf("metrics: bad labels in %q", line)
				}
				end := strings.Index(after, `"`)
				for end > 0 && after[end-1] == '\\' {
					end += 1 + strings.Index(after[end+1:], `"`)
				}
				if end < 0 {
					return nil, fmt.Errorf("metrics: bad labels in %q", line)
				}
				labels[k] = after[:end]
				body = strings.TrimPrefix(after[end+1:], ",")
			}
		} else {
			name, value, _ = strings.Cut(line, " ")
		}
		if len(names) > 0 && !slices.Contains(names, name) {
			continue
		}
		v, err := strconv.ParseFloat(strings.Fields(value)[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics: bad value in %q", line)
		}
		out = append(out, Sample{Name: name, Labels: labels, Value: v})
	}
	return out, sc.Err()
}

// Sum adds the values of the samples whose labels include every pair of
// match.
func Sum(ms []Sample, match map[string]string) float64 {
	var sum float64
	for _, m := range ms {
		if m.Matches(match) {
			sum += m.Value
		}
	}
	return sum
}

// Matches reports whether the sample's labels include every pair of
// match.
func (s Sample) Matches(match map[string]string) bool {
	for k, v := range match {
		if s.Labels[k] != v {
			return false
		}
	}
	return true
}
