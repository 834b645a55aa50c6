// Package cniinstall puts the amber-cni binary on the node and chains it
// at the end of the node's active CNI network configuration, and takes
// both away again.
package cniinstall

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/amber-mesh/amber/internal/atomicfile"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Defaults of the usual node layout.
const (
	DefaultBinDir  = "/opt/cni/bin"
	DefaultConfDir = "/etc/cni/net.d"
	// PluginType is amber-cni's "type" in a conflist and its binary name.
	PluginType = "amber-cni"
)

// ErrNoConfig is returned while the node has no CNI configuration yet
// (the primary CNI has not installed its own): retry later.
var ErrNoConfig = errors.New("no CNI network configuration on the node yet")

// Config says where to install. The zero value is the usual node layout
// with the plugin binary next to the running executable.
type Config struct {
	// BinDir receives the plugin binary. Zero means DefaultBinDir.
	BinDir string
	// ConfDir holds the node's network configurations. Zero means
	// DefaultConfDir.
	ConfDir string
	// ConfFile names the configuration to chain into, inside ConfDir.
	// Zero means the one the runtime uses: the first .conf, .conflist or
	// .json file in lexical order (libcni's ConfFiles order).
	ConfFile string
	// Source is the plugin binary to copy. Zero means "amber-cni" next to
	// the running executable.
	Source string
	// Plugin is amber-cni's entry; its "type" is set to PluginType.
	Plugin map[string]any
}

func (c Config) withDefaults() (Config, error) {
	if c.BinDir == "" {
		c.BinDir = DefaultBinDir
	}
	if c.ConfDir == "" {
		c.ConfDir = DefaultConfDir
	}
	if c.Source == "" {
		exe, err := os.Executable()
		if err != nil {
			return c, fmt.Errorf("locate plugin binary: %w", err)
		}
		c.Source = filepath.Join(filepath.Dir(exe), PluginType)
	}
	return c, nil
}

// Install copies the binary (only when it changed) and chains the plugin
// into the active configuration (only when missing or different), so it
// can be called periodically to repair a configuration rewritten by the
// primary CNI. It returns the configuration file it chained into.
func Install(cfg Config) (string, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return "", err
	}
	if err := installBinary(cfg.Source, filepath.Join(cfg.BinDir, PluginType)); err != nil {
		return "", err
	}
	path, err := activeConf(cfg)
	if err != nil {
		return "", err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	list, err := toConflist(path, data)
	if err != nil {
		return "", err
	}
	entry := map[string]any{}
	for k, v := range cfg.Plugin {
		entry[k] = v
	}
	entry["type"] = PluginType
	raw, err := json.Marshal(entry)
	if err != nil {
		return "", err
	}
	plugins := withoutAmber(list.plugins)
	list.plugins = append(plugins, raw)
	out, err := list.marshal()
	if err != nil {
		return "", err
	}
	target := path
	if filepath.Ext(path) == ".conf" {
		// A single-plugin file cannot chain: rewrite it as a list under
		// a name that sorts the same way, and drop the original.
		target = strings.TrimSuffix(path, ".conf") + ".conflist"
	}
	if target == path && bytes.Equal(bytes.TrimSpace(out), bytes.TrimSpace(data)) {
		return path, nil
	}
	if err := atomicfile.Write(target, out, 0o644, 0o755); err != nil {
		return "", fmt.Errorf("write %s: %w", target, err)
	}
	if target != path {
		if err := os.Remove(path); err != nil {
			return "", fmt.Errorf("replace %s: %w", path, err)
		}
	}
	return target, nil
}

// Uninstall removes amber-cni from every configuration in ConfDir and
// deletes the binary. What is not there is not an error.
func Uninstall(cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	files, err := confFiles(cfg.ConfDir)
	if err != nil {
		return err
	}
	var errs []error
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		list, err := toConflist(path, data)
		if err != nil || filepath.Ext(path) == ".conf" {
			continue
		}
		kept := withoutAmber(list.plugins)
		if len(kept) == len(list.plugins) {
			continue
		}
		list.plugins = kept
		out, err := list.marshal()
		if err == nil {
			err = atomicfile.Write(path, out, 0o644, 0o755)
		}
		errs = append(errs, err)
	}
	if err := os.Remove(filepath.Join(cfg.BinDir, PluginType)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Chained reports whether the active configuration ends with amber-cni.
func Chained(cfg Config) (bool, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return false, err
	}
	path, err := activeConf(cfg)
	if err != nil {
		return false, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	list, err := toConflist(path, data)
	if err != nil || len(list.plugins) == 0 {
		return false, err
	}
	return pluginType(list.plugins[len(list.plugins)-1]) == PluginType, nil
}

func confFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", dir, err)
	}
	var out []string
	for _, e := range ents {
		switch filepath.Ext(e.Name()) {
		case ".conf", ".conflist", ".json":
			if !e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
				out = append(out, filepath.Join(dir, e.Name()))
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

func activeConf(cfg Config) (string, error) {
	if cfg.ConfFile != "" {
		path := filepath.Join(cfg.ConfDir, cfg.ConfFile)
		if _, err := os.Stat(path); err != nil {
			return "", fmt.Errorf("%w: %v", ErrNoConfig, err)
		}
		return path, nil
	}
	files, err := confFiles(cfg.ConfDir)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrNoConfig, err)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if _, err := toConflist(f, data); err == nil {
			return f, nil
		}
	}
	return "", fmt.Errorf("%w in %s", ErrNoConfig, cfg.ConfDir)
}

// conflist keeps every field of a configuration as it was, so that the
// primary CNI's settings survive the rewrite.
type conflist struct {
	fields  map[string]json.RawMessage
	plugins []json.RawMessage
}

func toConflist(path string, data []byte) (*conflist, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(data, &fields); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	l := &conflist{fields: fields}
	if raw, ok := fields["plugins"]; ok {
		if err := json.Unmarshal(raw, &l.plugins); err != nil {
			return nil, fmt.Errorf("parse %s plugins: %w", path, err)
		}
		return l, nil
	}
	if _, ok := fields["type"]; !ok {
		return nil, fmt.Errorf("parse %s: neither a plugin nor a plugin list", path)
	}
	// A single plugin: name and version move up to the list.
	l.fields = map[string]json.RawMessage{}
	for _, k := range []string{"cniVersion", "name"} {
		if v, ok := fields[k]; ok {
			l.fields[k] = v
		}
	}
	l.plugins = []json.RawMessage{data}
	return l, nil
}

func (l *conflist) marshal() ([]byte, error) {
	fields := map[string]json.RawMessage{}
	for k, v := range l.fields {
		fields[k] = v
	}
	raw, err := json.Marshal(l.plugins)
	if err != nil {
		return nil, err
	}
	fields["plugins"] = raw
	out, err := json.MarshalIndent(fields, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

func pluginType(raw json.RawMessage) string {
	var p struct {
		Type string `json:"type"`
	}
	json.Unmarshal(raw, &p)
	return p.Type
}

func withoutAmber(plugins []json.RawMessage) []json.RawMessage {
	return slices.DeleteFunc(slices.Clone(plugins), func(r json.RawMessage) bool { return pluginType(r) == PluginType })
}

func installBinary(src, dst string) error {
	want, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("read plugin binary: %w", err)
	}
	if have, err := os.ReadFile(dst); err == nil && bytes.Equal(have, want) {
		return nil
	}
	// A new inode renamed into place: a runtime executing the old binary
	// right now keeps it intact.
	if err := atomicfile.Write(dst, want, 0o755, 0o755); err != nil {
		return fmt.Errorf("install plugin binary: %w", err)
	}
	return nil
}
