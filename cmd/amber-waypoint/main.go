// Command amber-waypoint is amber's L7 waypoint: the container istiod's
// waypoint template runs (`proxy waypoint --domain … --serviceCluster …`,
// its environment and mounted files; docs/waypoint.md, "The container
// contract"), configured by istiod as a waypoint node.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/amber-mesh/amber/internal/cli"
	"github.com/amber-mesh/amber/waypoint"
	"github.com/amber-mesh/amber/waypoint/contract"
)

func main() {
	// A performance setting: without it the proxy still works, slower
	// per connection.
	if err := cli.KeepMonitorAwake(); err != nil {
		fmt.Fprintln(os.Stderr, "amber-waypoint: warning:", err)
	}
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "amber-waypoint:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	c, err := contract.Load(args, os.Environ(), "/")
	if err != nil {
		return err
	}
	if err := c.Validate(); err != nil {
		return err
	}
	logger, err := cli.Logger(c.LogFormat, c.LogLevel)
	if err != nil {
		return err
	}
	c.LogIgnored(logger)
	cfg := c.Config
	cfg.Logger = logger
	cfg.NewDataPath = newDataPath
	return cli.RunUntilSignal(func(ctx context.Context) error { return waypoint.Run(ctx, cfg) })
}
