// Command coredns is CoreDNS with only the plugins the local cluster's DNS needs: the kubernetes
// plugin answers Service, headless-Service and pod-hostname names the way a cluster's DNS does.
// Importing each plugin registers it; the directive list fixes their order in a server block.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	// The upstream plugin.cfg order, restricted to these plugins.
	dnsserver.Directives = []string{"bind", "ready", "errors", "log", "kubernetes"}
}

func main() {
	coremain.Run()
}
