"""The HTTP face of the ingress: site, resources, proxying, error rendering."""

from twisted.web.http_headers import _NameEncoder

# Twisted re-capitalises header names on output (Http-Header-Case); teach it
# the spelling of the ingress's own headers so clients see them as
# documented.  Additive and idempotent; see _NameEncoder in
# https://github.com/twisted/twisted/blob/trunk/src/twisted/web/http_headers.py
_NameEncoder._caseMappings.update(
    {
        b"Reverse-Proxy-Server-Powerby": b"Reverse-Proxy-Server-PowerBy",
        b"Opensandbox-Ingress-Error": b"OpenSandbox-Ingress-Error",
        b"Opensandbox-Ingress-To": b"OpenSandbox-Ingress-To",
        b"Opensandbox-Secure-Access": b"OpenSandbox-Secure-Access",
    }
)
