"""The OpenSSL configuration easy-rsa 3.1.0 expects inside a PKI (openssl-easyrsa.cnf).

easy-rsa refuses to run on a PKI without it. ``certwarden init`` copies the one of the easy-rsa
installed on the host, so both agree exactly, and writes this equivalent when there is none.
It uses the same section names and $ENV::EASYRSA_* variables easy-rsa fills in.
"""

from __future__ import annotations

from pathlib import Path

from certwarden.atomicfile import write_atomic

INSTALLED_LOCATIONS = (
    Path("/usr/share/easy-rsa/openssl-easyrsa.cnf"),
    Path("/usr/local/share/easy-rsa/openssl-easyrsa.cnf"),
    Path("/etc/easy-rsa/openssl-easyrsa.cnf"),
)

# Where Debian's and a hand-installed easy-rsa put the program.
EASYRSA_PROGRAMS = (
    Path("/usr/share/easy-rsa/easyrsa"),
    Path("/usr/local/share/easy-rsa/easyrsa"),
)
# What openssl-easyrsa.cnf reads through $ENV:: besides EASYRSA_PKI, with easy-rsa 3.1.0's
# defaults: the environment `openssl ca -config pki/openssl-easyrsa.cnf` needs outside easy-rsa.
OPENSSL_CA_ENV = {
    "EASYRSA_CERT_EXPIRE": "825",
    "EASYRSA_CRL_DAYS": "180",
    "EASYRSA_DIGEST": "sha256",
    "EASYRSA_DN": "cn_only",
    "EASYRSA_KEY_SIZE": "2048",
    "EASYRSA_REQ_CN": "ChangeMe",
    "EASYRSA_REQ_COUNTRY": "US",
    "EASYRSA_REQ_PROVINCE": "California",
    "EASYRSA_REQ_CITY": "San Francisco",
    "EASYRSA_REQ_ORG": "Copyleft Certificate Co",
    "EASYRSA_REQ_OU": "My Organizational Unit",
    "EASYRSA_REQ_EMAIL": "me@example.net",
}

OPENSSL_EASYRSA_CNF = """\
# OpenSSL configuration for easy-rsa 3.x, written by certwarden init.
[ ca ]
default_ca = CA_default

[ CA_default ]
dir = $ENV::EASYRSA_PKI
certs = $dir
crl_dir = $dir
database = $dir/index.txt
new_certs_dir = $dir/certs_by_serial
certificate = $dir/ca.crt
serial = $dir/serial
crl = $dir/crl.pem
private_key = $dir/private/ca.key
RANDFILE = $dir/.rand
x509_extensions = basic_exts
# easy-rsa replaces these marker lines (--copy-ext, --subject-alt-name, build-ca extras);
# without them it silently drops those options.
#%COPY_EXTS%
crl_extensions = crl_ext
default_days = $ENV::EASYRSA_CERT_EXPIRE
default_crl_days = $ENV::EASYRSA_CRL_DAYS
default_md = $ENV::EASYRSA_DIGEST
preserve = no
unique_subject = no
policy = policy_anything

[ policy_anything ]
countryName = optional
stateOrProvinceName = optional
localityName = optional
organizationName = optional
organizationalUnitName = optional
commonName = supplied
name = optional
emailAddress = optional

[ req ]
default_bits = $ENV::EASYRSA_KEY_SIZE
default_keyfile = privkey.pem
default_md = $ENV::EASYRSA_DIGEST
distinguished_name = $ENV::EASYRSA_DN
x509_extensions = easyrsa_ca
#%EXTRA_EXTS%

[ cn_only ]
commonName = Common Name (eg: your user, host, or server name)
commonName_max = 64
commonName_default = $ENV::EASYRSA_REQ_CN

[ org ]
countryName = Country Name (2 letter code)
countryName_default = $ENV::EASYRSA_REQ_COUNTRY
countryName_min = 2
countryName_max = 2
stateOrProvinceName = State or Province Name (full name)
stateOrProvinceName_default = $ENV::EASYRSA_REQ_PROVINCE
localityName = Locality Name (eg, city)
localityName_default = $ENV::EASYRSA_REQ_CITY
0.organizationName = Organization Name (eg, company)
0.organizationName_default = $ENV::EASYRSA_REQ_ORG
organizationalUnitName = Organizational Unit Name (eg, section)
organizationalUnitName_default = $ENV::EASYRSA_REQ_OU
commonName = Common Name (eg: your user, host, or server name)
commonName_max = 64
commonName_default = $ENV::EASYRSA_REQ_CN
emailAddress = Email Address
emailAddress_default = $ENV::EASYRSA_REQ_EMAIL
emailAddress_max = 64

[ basic_exts ]
basicConstraints = CA:FALSE
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer:always

[ easyrsa_ca ]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always,issuer:always
basicConstraints = CA:true
keyUsage = cRLSign, keyCertSign
#%CA_X509_TYPES_EXTRA_EXTS%

[ crl_ext ]
authorityKeyIdentifier = keyid:always,issuer:always
"""


def write_easyrsa_conf(pki_dir: Path, *, prefer_installed: bool = True) -> Path:
    """Write openssl-easyrsa.cnf into ``pki_dir`` unless one is there already."""
    target = pki_dir / "openssl-easyrsa.cnf"
    if target.exists():
        return target
    data = OPENSSL_EASYRSA_CNF.encode()
    if prefer_installed:
        for candidate in INSTALLED_LOCATIONS:
            if candidate.is_file():
                data = candidate.read_bytes()
                break
    write_atomic(target, data, 0o600)
    return target
