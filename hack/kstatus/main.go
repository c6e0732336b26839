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
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

// objects splits one decoded document into objects: a List's items (which the API server sends
// without kind and apiVersion: they are taken from the List) or the document itself.
func objects(raw json.RawMessage) ([]*unstructured.Unstructured, error) {
	var list struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Items      []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, err
	}
	if list.Items == nil {
		u := &unstructured.Unstructured{}
		// UnmarshalJSON keeps integers as int64, as kstatus' accessors expect.
		return []*unstructured.Unstructured{u}, u.UnmarshalJSON(raw)
	}
	out := make([]*unstructured.Unstructured, 0, len(list.Items))
	for _, item := range list.Items {
		u := &unstructured.Unstructured{Object: map[string]interface{}{}}
		var probe map[string]interface{}
		if err := json.Unmarshal(item, &probe); err != nil {
			return nil, err
		}
		if probe["kind"] == nil {
			probe["kind"] = strings.TrimSuffix(list.Kind, "List")
			probe["apiVersion"] = list.APIVersion
			fixed, err := json.Marshal(probe)
			if err != nil {
				return nil, err
			}
			item = fixed
		}
		if err := u.UnmarshalJSON(item); err != nil {
			return nil, err
		}
		out = append(out, u)
	}
	return out, nil
}

func main() {
	dec := json.NewDecoder(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); errors.Is(err, io.EOF) {
			return
		} else if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus: reading stdin:", err)
			os.Exit(2)
		}
		objs, err := objects(raw)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus: not a Kubernetes object:", err)
			os.Exit(2)
		}
		for _, u := range objs {
			res, err := status.Compute(u)
			if err != nil {
				fmt.Fprintf(os.Stderr, "kstatus: %s %s: %v\n", u.GetKind(), u.GetName(), err)
				os.Exit(1)
			}
			v := verdict{Kind: u.GetKind(), Name: u.GetName(), Status: res.Status.String(), Message: res.Message}
			if err := out.Encode(v); err != nil {
				os.Exit(1)
			}
		}
	}
}
