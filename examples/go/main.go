// A Go app staged by the go buildpack with the toolchain its go.mod asks for.
package main

import (
	"fmt"
	"log"
	"net/http"
	"os"
	"runtime"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from go (%s)\n", runtime.Version())
	})
	log.Fatal(http.ListenAndServe(":"+os.Getenv("PORT"), nil))
}
