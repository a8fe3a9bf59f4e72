// A minimal Go reverse proxy, the reference the ingress is measured
// against: net/http/httputil.ReverseProxy (the Go ingress's engine) to one
// backend, keep-alive pool, nothing else. Standard library only.
//
//	go build -o refproxy main.go
//	GOMAXPROCS=1 ./refproxy -listen 127.0.0.1:8081 -backend http://127.0.0.1:8080
package main

import (
	"flag"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8081", "address to serve on")
	backend := flag.String("backend", "", "backend base URL")
	flag.Parse()
	target, err := url.Parse(*backend)
	if err != nil || target.Host == "" {
		log.Fatalf("-backend: %q is not a URL", *backend)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = &http.Transport{
		MaxIdleConns:        4096,
		MaxIdleConnsPerHost: 4096,
		DisableCompression:  true,
	}
	log.Fatal(http.ListenAndServe(*listen, proxy))
}
