//! TLS on the control plane, its trust rooted in the cluster token.
//!
//! ## Design
//! Every gRPC call carries the cluster token, so the token must never cross a
//! network in clear, and a client must know it talks to its own coordinator before
//! it sends it. Both follow from one certificate authority that every holder of the
//! token can compute and no one else can: its Ed25519 key is derived from the token
//! (an HMAC of it), and its name is fixed. The coordinator signs a fresh server
//! certificate with it at every start (name [`SERVER_NAME`], a new key); agents,
//! workers and clients trust that authority alone and check the server's name
//! against it. So nothing but the token itself has to be handed to a new node —
//! no CA file, no fingerprint — and a man in the middle without the token can
//! neither read the calls (TLS 1.3) nor pass for the coordinator.
//!
//! Whoever holds the token can stand in for the coordinator: the token is the
//! cluster's one secret, as before. Plaintext HTTP/2 remains, on both ends, only
//! with an explicit `--insecure` (an `http://` coordinator address).
//!
//! An operator with a certificate authority of their own can use it instead: the
//! coordinator serves their certificate ([`operator_server_config`]), and every
//! node trusts their authority for the host name it dials
//! ([`operator_client_config`]); the token then only authenticates calls.

use hmac::{Hmac, Mac};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use sha2::Sha256;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name the coordinator's certificate carries and clients check, whatever
/// address they reach it at.
pub const SERVER_NAME: &str = "hetero-coordinator";

/// The PKCS#8 (RFC 8410) encoding of the Ed25519 key whose seed is `seed`.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    [&PREFIX[..], seed].concat()
}

/// The cluster authority's key: the same on every node that holds `token`.
fn authority_key(token: &str) -> Result<KeyPair, String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"hetero control-plane certificate authority v1");
    let seed: [u8; 32] = mac.finalize().into_bytes().into();
    KeyPair::try_from(&ed25519_pkcs8(&seed)[..]).map_err(|e| format!("deriving the cluster authority's key: {e}"))
}

/// The authority's certificate parameters (its name, and that it signs certificates).
fn authority_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Hetero cluster authority");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// The authority `token` derives: its key and its self-signed certificate.
fn authority(token: &str) -> Result<(KeyPair, rcgen::Certificate), String> {
    let key = authority_key(token)?;
    let cert = authority_params()
        .self_signed(&key)
        .map_err(|e| format!("making the cluster authority's certificate: {e}"))?;
    Ok((key, cert))
}

/// The authority's certificate, in PEM.
fn authority_pem(token: &str) -> Result<String, String> {
    Ok(authority(token)?.1.pem())
}

/// What a coordinator serves with: a new key and certificate for [`SERVER_NAME`],
/// signed by the authority `token` derives, sent with the authority's certificate.
pub fn server_config(token: &str) -> Result<ServerTlsConfig, String> {
    let (authority, authority_cert) = authority(token)?;
    let issuer = Issuer::new(authority_params(), authority);
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| format!("making the coordinator's key: {e}"))?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(|e| format!("naming the coordinator's certificate: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, SERVER_NAME);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| format!("signing the coordinator's certificate: {e}"))?;
    let chain = format!("{}{}", cert.pem(), authority_cert.pem());
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(chain, key.serialize_pem())))
}

/// What agents, workers and clients connect with: trust the authority `token`
/// derives, and nothing else, for the name [`SERVER_NAME`].
pub fn client_config(token: &str) -> Result<ClientTlsConfig, String> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(authority_pem(token)?))
        .domain_name(SERVER_NAME))
}

/// What a coordinator serves with under an operator's own authority: their
/// certificate chain and its key, both PEM. Refused unless both hold what they
/// should.
pub fn operator_server_config(cert_pem: &str, key_pem: &str) -> Result<ServerTlsConfig, String> {
    if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("the certificate file holds no PEM certificate".into());
    }
    if !key_pem.contains("PRIVATE KEY-----") {
        return Err("the key file holds no PEM private key".into());
    }
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
}

/// What nodes connect with under an operator's authority `ca_pem`: trust it alone,
/// for `host` (the name or address they dial, which the certificate must carry).
pub fn operator_client_config(ca_pem: &str, host: &str) -> Result<ClientTlsConfig, String> {
    if !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("the authority file holds no PEM certificate".into());
    }
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_is_the_same_for_one_token_and_another_for_another() {
        let a = authority_key("token-a").unwrap().public_key_raw().to_vec();
        assert_eq!(a, authority_key("token-a").unwrap().public_key_raw());
        assert_ne!(a, authority_key("token-b").unwrap().public_key_raw());
        assert!(
            authority_pem("token-a")
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        server_config("token-a").unwrap();
        client_config("token-a").unwrap();
    }
}
