// Command etcd is etcd's own server entry point, built from go.etcd.io/etcd/server/v3 so that the
// local cluster runs the etcd release that current Kubernetes is tested against (Debian ships 3.4).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
