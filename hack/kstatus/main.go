// Command kstatus prints the status that Flux, kpt and cli-utils compute for Kubernetes objects.
//
// It reads JSON objects (one, a list, or a stream) from stdin and writes one JSON line per object:
// {"kind","name","status","message"}. status is kstatus' verdict: InProgress, Failed, Current,
// Terminating, NotFound or Unknown. Tests pipe live objects through it to assert what GitOps tools see.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func compute(obj map[string]interface{}) (verdict, error) {
	u := &unstructured.Unstructured{Object: obj}
	res, err := status.Compute(u)
	if err != nil {
		return verdict{}, fmt.Errorf("%s %s: %w", u.GetKind(), u.GetName(), err)
	}
	return verdict{Kind: u.GetKind(), Name: u.GetName(), Status: res.Status.String(), Message: res.Message}, nil
}

func main() {
	dec := json.NewDecoder(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for {
		var obj map[string]interface{}
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			return
		} else if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus: reading stdin:", err)
			os.Exit(2)
		}
		objects := []interface{}{obj}
		if items, ok := obj["items"].([]interface{}); ok {
			objects = items
		}
		for _, item := range objects {
			m, ok := item.(map[string]interface{})
			if !ok {
				fmt.Fprintln(os.Stderr, "kstatus: not an object")
				os.Exit(2)
			}
			v, err := compute(m)
			if err != nil {
				fmt.Fprintln(os.Stderr, "kstatus:", err)
				os.Exit(1)
			}
			if err := out.Encode(v); err != nil {
				os.Exit(1)
			}
		}
	}
}
