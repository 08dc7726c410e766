use super::*;
use crate::secret::InstallationSecret;
use crate::userlist::{LoadOptions, UserList, UserListError};
use postgres_protocol::authentication::sasl::{ChannelBinding as PpBinding, ScramSha256};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// RFC 7677 section 3.
const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_FIRST: &str =
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

fn parse_list(text: &str, origin: &str) -> Result<UserList, UserListError> {
    let options = LoadOptions::new(std::sync::Arc::new(InstallationSecret::random()));
    UserList::parse(text, origin, &options).map(|(list, _)| list)
}

fn rfc_verifier() -> ScramVerifier {
    ScramVerifier::from_password("pencil", &B64.decode(RFC_SALT).unwrap(), 4096)
}

fn password(p: &str) -> ScramCredential {
    ScramCredential::Password(p.to_owned())
}

/// Runs a whole exchange; on success also checks the client accepted the server-final.
fn exchange(server: &mut ScramServer, client: &mut ScramClient) -> Result<ClientKey, ScramError> {
    let first = client.client_first();
    let server_first = server.handle_client_first(MECHANISM, &first)?;
    let client_final = client.handle_server_first(&server_first)?;
    let fin = server.handle_client_final(&client_final)?;
    client.handle_server_final(&fin.server_final)?;
    Ok(fin.client_key)
}

#[test]
fn rfc7677_client_vector() {
    let mut client = ScramClient::new(password("pencil"));
    let first = client.client_first_with("user", RFC_CLIENT_NONCE);
    assert_eq!(first, RFC_CLIENT_FIRST.as_bytes());
    let fin = client
        .handle_server_first(RFC_SERVER_FIRST.as_bytes())
        .unwrap();
    assert_eq!(String::from_utf8(fin).unwrap(), RFC_CLIENT_FINAL);
    client
        .handle_server_final(RFC_SERVER_FINAL.as_bytes())
        .unwrap();
}

#[test]
fn rfc7677_client_rejects_wrong_server_signature() {
    let mut client = ScramClient::new(password("pencil"));
    client.client_first_with("user", RFC_CLIENT_NONCE);
    client
        .handle_server_first(RFC_SERVER_FIRST.as_bytes())
        .unwrap();
    let bad = "v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
    assert!(matches!(
        client.handle_server_final(bad.as_bytes()),
        Err(ScramError::ServerSignatureMismatch)
    ));
}

#[test]
fn rfc7677_server_vector() {
    let mut server = ScramServer::new(rfc_verifier(), true);
    let sf = server
        .handle_client_first_with_nonce(MECHANISM, RFC_CLIENT_FIRST.as_bytes(), RFC_SERVER_NONCE)
        .unwrap();
    assert_eq!(String::from_utf8(sf).unwrap(), RFC_SERVER_FIRST);
    let fin = server
        .handle_client_final(RFC_CLIENT_FINAL.as_bytes())
        .unwrap();
    assert_eq!(
        String::from_utf8(fin.server_final).unwrap(),
        RFC_SERVER_FINAL
    );
    // The recovered ClientKey belongs to the verifier.
    assert!(rfc_verifier().matches_client_key(&fin.client_key));
    // A later call is out of order.
    assert!(matches!(
        server.handle_client_final(RFC_CLIENT_FINAL.as_bytes()),
        Err(ScramError::OutOfOrder)
    ));
}

#[test]
fn round_trip_plain_entry() {
    let list = parse_list("\"alice\" \"correct horse\"", "t").unwrap();
    let (v, known) = list.verifier_for("alice");
    assert!(known);
    let mut server = ScramServer::new(v.clone(), known);
    let mut client = ScramClient::new(password("correct horse"));
    let ck = exchange(&mut server, &mut client).unwrap();
    assert!(v.matches_client_key(&ck));
}

#[test]
fn round_trip_verifier_entry() {
    let v = ScramVerifier::from_password("s3cret", b"some salt bytes!", 8192);
    let list = parse_list(&format!("\"bob\" \"{}\"", v.to_pg_string()), "t").unwrap();
    let (v2, known) = list.verifier_for("bob");
    assert!(known && v2 == v);
    assert_eq!(v2.iterations, 8192);
    let mut server = ScramServer::new(v2, known);
    exchange(&mut server, &mut ScramClient::new(password("s3cret"))).unwrap();
}

#[test]
fn pass_through_with_recovered_client_key() {
    let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
    let mut front = ScramServer::new(v.clone(), true);
    let ck = exchange(&mut front, &mut ScramClient::new(password("pw"))).unwrap();

    // The "backend": a second server with the same verifier.
    let mut backend = ScramServer::new(v.clone(), true);
    let mut client = ScramClient::new(ScramCredential::ClientKey {
        client_key: ck.clone(),
        verifier: v.clone(),
    });
    let ck2 = exchange(&mut backend, &mut client).unwrap();
    assert!(v.matches_client_key(&ck2));

    // A backend whose verifier has another salt: detected before sending a proof.
    let other = ScramVerifier::from_password("pw", b"fedcba9876543210", 4096);
    let mut backend = ScramServer::new(other, true);
    let mut client = ScramClient::new(ScramCredential::ClientKey {
        client_key: ck.clone(),
        verifier: v.clone(),
    });
    assert!(matches!(
        exchange(&mut backend, &mut client),
        Err(ScramError::VerifierMismatch)
    ));

    // Same salt, other iteration count: also a mismatch.
    let other = ScramVerifier::from_password("pw", b"0123456789abcdef", 4097);
    let mut backend = ScramServer::new(other, true);
    let mut client = ScramClient::new(ScramCredential::ClientKey {
        client_key: ck,
        verifier: v,
    });
    assert!(matches!(
        exchange(&mut backend, &mut client),
        Err(ScramError::VerifierMismatch)
    ));
}

#[test]
fn pass_through_detects_backend_with_other_server_key() {
    // Same salt and iterations but another password: the backend cannot accept our proof, and
    // if it claimed success its signature would not verify against our verifier's ServerKey.
    let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
    let ck = ClientKey::from_password("pw", &v.salt, v.iterations);
    let backend_v = ScramVerifier::from_password("other", b"0123456789abcdef", 4096);
    let mut backend = ScramServer::new(backend_v, true);
    let mut client = ScramClient::new(ScramCredential::ClientKey {
        client_key: ck,
        verifier: v,
    });
    assert!(matches!(
        exchange(&mut backend, &mut client),
        Err(ScramError::AuthFailed)
    ));
}

#[test]
fn wrong_password_fails() {
    let v = ScramVerifier::from_password("right", b"0123456789abcdef", 4096);
    let mut server = ScramServer::new(v, true);
    assert!(matches!(
        exchange(&mut server, &mut ScramClient::new(password("wrong"))),
        Err(ScramError::AuthFailed)
    ));
}

#[test]
fn unknown_user_always_fails() {
    let list = parse_list("\"alice\" \"pw\"", "t").unwrap();
    for pw in ["pw", "", "anything"] {
        let (mock, known) = list.verifier_for("mallory");
        assert!(!known);
        let mut server = ScramServer::new(mock, known);
        assert!(matches!(
            exchange(&mut server, &mut ScramClient::new(password(pw))),
            Err(ScramError::AuthFailed)
        ));
    }
    // Even a proof that matches the verifier fails when the user is unknown.
    let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
    let mut server = ScramServer::new(v, false);
    assert!(matches!(
        exchange(&mut server, &mut ScramClient::new(password("pw"))),
        Err(ScramError::AuthFailed)
    ));
    // The mock salt is stable per user and differs between users.
    let secret = InstallationSecret::random();
    let mock = |u| ScramVerifier::mock(&secret, u, 4096);
    assert_eq!(mock("x").salt, mock("x").salt);
    assert_ne!(mock("x").salt, mock("y").salt);
    assert_eq!(mock("x").iterations, 4096);
}

#[test]
fn postgres_protocol_verifier_parses_and_authenticates() {
    let s = postgres_protocol::password::scram_sha_256(b"secret");
    let v = ScramVerifier::parse(&s).unwrap();
    assert_eq!(v.to_pg_string(), s);
    assert_eq!(v.iterations, 4096);
    let mut server = ScramServer::new(v.clone(), true);
    exchange(&mut server, &mut ScramClient::new(password("secret"))).unwrap();
    let mut server = ScramServer::new(v, true);
    assert!(matches!(
        exchange(&mut server, &mut ScramClient::new(password("Secret"))),
        Err(ScramError::AuthFailed)
    ));
}

#[test]
fn saslprep_matches_postgres_protocol() {
    // U+00AD is mapped to nothing by SASLprep; U+0007 is prohibited, so the raw bytes are used.
    for (stored, typed) in [("I\u{00AD}X", "IX"), ("a\u{7}b", "a\u{7}b"), ("ü", "ü")] {
        let v = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(
            stored.as_bytes(),
        ))
        .unwrap();
        let mut server = ScramServer::new(v, true);
        exchange(&mut server, &mut ScramClient::new(password(typed)))
            .unwrap_or_else(|e| panic!("{stored:?}: {e}"));
    }
}

#[test]
fn postgres_protocol_client_against_our_server() {
    for cb in [PpBinding::unsupported(), PpBinding::unrequested()] {
        let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
        let mut server = ScramServer::new(v, true);
        let mut client = ScramSha256::new(b"pw", cb);
        let sf = server
            .handle_client_first(MECHANISM, client.message())
            .unwrap();
        client.update(&sf).unwrap();
        let fin = server.handle_client_final(client.message()).unwrap();
        client.finish(&fin.server_final).unwrap();
    }
}

#[test]
fn server_rejects_bad_client_messages() {
    let v = rfc_verifier();
    let first = |data: &str| {
        ScramServer::new(v.clone(), true).handle_client_first(MECHANISM, data.as_bytes())
    };
    // Binding data with the mechanism that has none (PostgreSQL: "malformed SCRAM message").
    assert!(matches!(
        first("p=tls-server-end-point,,n=,r=abc"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(
        first("n,,m=ext,n=,r=abc"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(
        first("x,,n=,r=abc"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(first("n,,n=,r="), Err(ScramError::Malformed(_))));
    assert!(matches!(
        first("n,,n=,r=a\u{7f}"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(
        first("n,,n=,r=a\0"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(first("n,,r=abc"), Err(ScramError::Malformed(_))));
    // authzid and trailing extensions are accepted and ignored.
    first("n,a=someone,n=user,r=abc").unwrap();
    first("y,,n=,r=abc,x=ext").unwrap();

    assert!(matches!(
        ScramServer::new(v.clone(), true).handle_client_first("SCRAM-SHA-256-PLUS", b"n,,n=,r=a"),
        Err(ScramError::UnsupportedMechanism(m)) if m == "SCRAM-SHA-256-PLUS"
    ));

    // c= must echo the gs2 header: "y,," is eSws, not biws.
    let mut server = ScramServer::new(v.clone(), true);
    let sf = server
        .handle_client_first(MECHANISM, format!("y,,n=,r={RFC_CLIENT_NONCE}").as_bytes())
        .unwrap();
    let nonce = String::from_utf8(sf).unwrap();
    let nonce = nonce
        .split(',')
        .next()
        .unwrap()
        .strip_prefix("r=")
        .unwrap()
        .to_owned();
    let proof = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    assert!(matches!(
        server.handle_client_final(format!("c=biws,r={nonce},{proof}").as_bytes()),
        Err(ScramError::Malformed(_))
    ));
    // After an error the exchange is over.
    assert!(matches!(
        server.handle_client_final(format!("c=eSws,r={nonce},{proof}").as_bytes()),
        Err(ScramError::OutOfOrder)
    ));

    // Wrong nonce in client-final.
    let mut server = ScramServer::new(v.clone(), true);
    server
        .handle_client_first(MECHANISM, RFC_CLIENT_FIRST.as_bytes())
        .unwrap();
    assert!(matches!(
        server.handle_client_final(RFC_CLIENT_FINAL.as_bytes()),
        Err(ScramError::Malformed("nonce does not match"))
    ));

    // Final before first; first twice.
    let mut server = ScramServer::new(v.clone(), true);
    assert!(matches!(
        server.handle_client_final(RFC_CLIENT_FINAL.as_bytes()),
        Err(ScramError::OutOfOrder)
    ));
    let mut server = ScramServer::new(v, true);
    server
        .handle_client_first(MECHANISM, RFC_CLIENT_FIRST.as_bytes())
        .unwrap();
    assert!(matches!(
        server.handle_client_first(MECHANISM, RFC_CLIENT_FIRST.as_bytes()),
        Err(ScramError::OutOfOrder)
    ));
}

#[test]
fn client_rejects_bad_server_messages() {
    let start = || {
        let mut c = ScramClient::new(password("pencil"));
        c.client_first_with("user", RFC_CLIENT_NONCE);
        c
    };
    for bad in [
        "r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        "r=rOprNGfwEbeRWgbNEkqOxyz,s=!!,i=4096",
        "r=rOprNGfwEbeRWgbNEkqOxyz,s=,i=4096",
        "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
        "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
        "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,x=y",
        "m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        "r=rOprNGfwEbeRWgbNEkqOxyz,i=4096",
    ] {
        assert!(
            matches!(
                start().handle_server_first(bad.as_bytes()),
                Err(ScramError::Malformed(_))
            ),
            "{bad}"
        );
    }

    let mut c = start();
    c.handle_server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
    assert!(matches!(
        c.handle_server_final(b"e=invalid-proof"),
        Err(ScramError::AuthFailed)
    ));
    let mut c = start();
    c.handle_server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
    assert!(matches!(
        c.handle_server_final(format!("{RFC_SERVER_FINAL},x=1").as_bytes()),
        Err(ScramError::Malformed(_))
    ));

    let mut c = ScramClient::new(password("pencil"));
    assert!(matches!(
        c.handle_server_first(RFC_SERVER_FIRST.as_bytes()),
        Err(ScramError::OutOfOrder)
    ));
    assert!(matches!(
        c.handle_server_final(RFC_SERVER_FINAL.as_bytes()),
        Err(ScramError::OutOfOrder)
    ));
}

#[test]
fn verifier_parse_errors() {
    let good = rfc_verifier().to_pg_string();
    assert!(ScramVerifier::parse(&good).unwrap() == rfc_verifier());
    let (head, keys) = good.rsplit_once('$').unwrap();
    let (stored, server) = keys.split_once(':').unwrap();
    for bad in [
        "".to_owned(),
        "SCRAM-SHA-256$".to_owned(),
        "SCRAM-SHA-1$4096:c2FsdA==$a:b".to_owned(),
        format!("{head}${stored}"),
        format!("{head}${stored}:"),
        format!("{head}${stored}:AAAA"),
        format!("{head}$!{stored}:{server}"),
        format!("SCRAM-SHA-256$0:c2FsdA==${stored}:{server}"),
        format!("SCRAM-SHA-256$+4096:c2FsdA==${stored}:{server}"),
        format!("SCRAM-SHA-256$99999999999:c2FsdA==${stored}:{server}"),
        format!("SCRAM-SHA-256$4096:${stored}:{server}"),
        format!("SCRAM-SHA-256$4096c2FsdA==${stored}:{server}"),
        format!("SCRAM-SHA-256$4096:c2FsdA=${stored}:{server}"),
    ] {
        assert!(
            matches!(
                ScramVerifier::parse(&bad),
                Err(ScramError::InvalidVerifier(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn debug_output_is_redacted() {
    let v = rfc_verifier();
    let dbg = format!("{v:?}");
    assert_eq!(dbg, "ScramVerifier { iterations: 4096, .. }");
    let ck = ClientKey::from_password("pencil", &v.salt, 4096);
    assert_eq!(format!("{ck:?}"), "ClientKey(..)");
    let cred = password("hunter2");
    assert!(!format!("{cred:?}").contains("hunter2"));
    let client = ScramClient::new(cred);
    assert!(!format!("{client:?}").contains("hunter2"));
    let e = ScramError::AuthFailed.to_string();
    assert_eq!(e, "authentication failed");
}

/// Every prefix of valid messages and seeded random garbage must give Ok or Err, never panic.
#[test]
fn garbage_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x5eed_f00d);
    let v = rfc_verifier();

    // A valid transcript to take prefixes and mutations of.
    let mut client = ScramClient::new(password("pencil"));
    let mut server = ScramServer::new(v.clone(), true);
    let cf = client.client_first_with("", "fixednonce");
    let sf = server.handle_client_first(MECHANISM, &cf).unwrap();
    let cfin = client.handle_server_first(&sf).unwrap();
    let sfin = server.handle_client_final(&cfin).unwrap().server_final;
    let userlist = format!(
        "; c\n\"a\"\"b\" \"pw\"\n\"v\" \"{}\" x\n\"m\" \"md5{}\"\n",
        v.to_pg_string(),
        "0".repeat(32)
    );

    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for msg in [&cf, &sf, &cfin, &sfin, userlist.as_bytes()] {
        for n in 0..=msg.len() {
            inputs.push(msg[..n].to_vec());
        }
        for _ in 0..50 {
            let mut m = msg.to_vec();
            let flips = rng.random_range(1..4);
            for _ in 0..flips {
                let i = rng.random_range(0..m.len());
                m[i] = rng.random();
            }
            inputs.push(m);
        }
    }
    for _ in 0..300 {
        let len = rng.random_range(0..80);
        let mut m = vec![0u8; len];
        rng.fill_bytes(&mut m);
        // Bias towards the syntax's own characters so parsing gets deeper.
        for b in m.iter_mut() {
            if rng.random_bool(0.5) {
                *b = *b"nyrpcsiv=,\"$:ae\n ".get(usize::from(*b) % 17).unwrap();
            }
        }
        inputs.push(m);
    }

    for input in &inputs {
        // Server, first message.
        let _ = ScramServer::new(v.clone(), true).handle_client_first(MECHANISM, input);
        // Server, final message after a valid first.
        let mut s = ScramServer::new(v.clone(), true);
        s.handle_client_first(MECHANISM, &cf).unwrap();
        let _ = s.handle_client_final(input);
        // The same with channel binding (-PLUS) on a TLS connection.
        let _ = ScramServer::with_channel_binding(v.clone(), true, tls())
            .handle_client_first(MECHANISM_PLUS, input);
        let mut s = ScramServer::with_channel_binding(v.clone(), true, tls());
        s.handle_client_first(MECHANISM_PLUS, b"p=tls-server-end-point,,n=,r=fixednonce")
            .unwrap();
        let _ = s.handle_client_final(input);
        // Client, server-first (cheap iteration counts only: garbage may say i=99999999).
        let mut c = ScramClient::new(password("pencil"));
        c.client_first_with("", "fixednonce");
        let text = String::from_utf8_lossy(input);
        let max_iter = text
            .split(',')
            .filter_map(|f| f.strip_prefix("i=")?.parse::<u64>().ok())
            .max();
        if max_iter.is_none_or(|n| n <= 5000) {
            let _ = c.handle_server_first(input);
        }
        // Client, server-final after a valid server-first.
        let mut c = ScramClient::new(password("pencil"));
        c.client_first_with("", "nonce");
        c.handle_server_first(b"r=nonceXYZ,s=c2FsdA==,i=1").unwrap();
        let _ = c.handle_server_final(input);
        // Verifier and userlist parsing (userlist only on short inputs: plaintext entries run
        // PBKDF2).
        let _ = ScramVerifier::parse(&text);
        if input.len() < 200 {
            let _ = parse_list(&text, "fuzz");
        }
    }
}

#[test]
fn derived_keys_are_reused_per_salt_and_still_authenticate() {
    let keys = std::sync::Arc::new(DerivedKeys::default());
    for (salt, expected_entries) in [(&b"salt-one"[..], 1), (b"salt-one", 1), (b"salt-two", 2)] {
        let verifier = ScramVerifier::from_password("pencil", salt, 4096);
        let mut server = ScramServer::new(verifier, true);
        let mut client = ScramClient::with_derived_keys(password("pencil"), keys.clone());
        exchange(&mut server, &mut client).expect("login with cached keys");
        assert_eq!(keys.len(), expected_entries);
    }
    // A wrong password is not rescued by keys cached for the right one:
    // the cache belongs to one password (one userlist entry).
    let verifier = ScramVerifier::from_password("other", b"salt-one", 4096);
    let mut server = ScramServer::new(verifier, true);
    let mut client = ScramClient::with_derived_keys(password("pencil"), keys.clone());
    assert!(exchange(&mut server, &mut client).is_err());
}

// ---------------------------------------------------------------------------------------------
// SCRAM-SHA-256-PLUS (tls-server-end-point)
// ---------------------------------------------------------------------------------------------

/// Stands in for the hash of the proxy's certificate.
fn end_point() -> Vec<u8> {
    sha256(b"pgferry test certificate").to_vec()
}

fn tls() -> ChannelBinding {
    ChannelBinding::TlsServerEndPoint(end_point())
}

/// A whole exchange driven by postgres-protocol's client (an independent implementation) with
/// `mechanism` and the client's binding choice.
fn pp_exchange(
    server: &mut ScramServer,
    mechanism: &str,
    password: &str,
    cb: PpBinding,
) -> Result<ClientKey, ScramError> {
    let mut client = ScramSha256::new(password.as_bytes(), cb);
    let sf = server.handle_client_first(mechanism, client.message())?;
    client.update(&sf).expect("client accepts server-first");
    let fin = server.handle_client_final(client.message())?;
    client
        .finish(&fin.server_final)
        .expect("client accepts server signature");
    Ok(fin.client_key)
}

#[test]
fn mechanisms_offered_per_connection() {
    assert_eq!(tls().mechanisms(), [MECHANISM_PLUS, MECHANISM]);
    assert_eq!(ChannelBinding::None.mechanisms(), [MECHANISM]);
    assert_eq!(ChannelBinding::TlsUnbindable.mechanisms(), [MECHANISM]);
}

#[test]
fn plus_exchange_with_correct_binding() {
    let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
    let mut server = ScramServer::with_channel_binding(v.clone(), true, tls());
    let ck = pp_exchange(
        &mut server,
        MECHANISM_PLUS,
        "pw",
        PpBinding::tls_server_end_point(end_point()),
    )
    .unwrap();
    // The ClientKey comes from the AuthMessage with the c= binding data in it: it is the real
    // one, and logs in to a backend (which sees c=biws) by pass-through.
    assert!(v.matches_client_key(&ck));
    let mut backend = ScramServer::new(v.clone(), true);
    let mut client = ScramClient::new(ScramCredential::ClientKey {
        client_key: ck,
        verifier: v.clone(),
    });
    assert!(v.matches_client_key(&exchange(&mut backend, &mut client).unwrap()));
}

#[test]
fn plus_exchange_with_wrong_binding_fails_alike_for_known_and_unknown_users() {
    let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
    let mut other = end_point();
    other[0] ^= 1;
    for known in [true, false] {
        let verifier = if known {
            v.clone()
        } else {
            ScramVerifier::mock(&InstallationSecret::random(), "mallory", 4096)
        };
        let mut server = ScramServer::with_channel_binding(verifier, known, tls());
        let res = pp_exchange(
            &mut server,
            MECHANISM_PLUS,
            "pw",
            PpBinding::tls_server_end_point(other.clone()),
        );
        assert!(
            matches!(res, Err(ScramError::ChannelBindingMismatch)),
            "known={known}: {res:?}"
        );
    }

    // c= that is only the gs2 header (no data), or the data under another header.
    let cases = [
        B64.encode(b"p=tls-server-end-point,,"),
        B64.encode([b"n,,".as_slice(), &end_point()].concat()),
        "biws".to_owned(),
    ];
    for c in cases {
        let mut server = ScramServer::with_channel_binding(v.clone(), true, tls());
        let sf = server
            .handle_client_first(MECHANISM_PLUS, b"p=tls-server-end-point,,n=,r=abc")
            .unwrap();
        let sf = String::from_utf8(sf).unwrap();
        let nonce = sf.split(',').next().unwrap().strip_prefix("r=").unwrap();
        let proof = B64.encode([0u8; 32]);
        assert!(matches!(
            server.handle_client_final(format!("c={c},r={nonce},p={proof}").as_bytes()),
            Err(ScramError::ChannelBindingMismatch)
        ));
    }
}

#[test]
fn y_flag_is_a_downgrade_when_plus_was_offered() {
    for known in [true, false] {
        let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
        let mut server = ScramServer::with_channel_binding(v, known, tls());
        assert!(matches!(
            pp_exchange(&mut server, MECHANISM, "pw", PpBinding::unrequested()),
            Err(ScramError::ChannelBindingNegotiation)
        ));
    }
    // Where -PLUS was not offered, "y" is the truth and is fine.
    for binding in [ChannelBinding::None, ChannelBinding::TlsUnbindable] {
        let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
        let mut server = ScramServer::with_channel_binding(v, true, binding);
        pp_exchange(&mut server, MECHANISM, "pw", PpBinding::unrequested()).unwrap();
    }
}

#[test]
fn plus_refused_where_not_offered() {
    for binding in [ChannelBinding::None, ChannelBinding::TlsUnbindable] {
        let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
        let mut server = ScramServer::with_channel_binding(v, true, binding);
        let res = pp_exchange(
            &mut server,
            MECHANISM_PLUS,
            "pw",
            PpBinding::tls_server_end_point(end_point()),
        );
        assert!(
            matches!(&res, Err(ScramError::UnsupportedMechanism(m)) if m == MECHANISM_PLUS),
            "{res:?}"
        );
    }
}

#[test]
fn plain_scram_still_works_over_tls() {
    let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
    let mut server = ScramServer::with_channel_binding(v.clone(), true, tls());
    let ck = pp_exchange(&mut server, MECHANISM, "pw", PpBinding::unsupported()).unwrap();
    assert!(v.matches_client_key(&ck));
    let mut server = ScramServer::with_channel_binding(v, true, tls());
    exchange(&mut server, &mut ScramClient::new(password("pw"))).unwrap();
}

#[test]
fn gs2_flag_must_agree_with_mechanism() {
    let v = ScramVerifier::from_password("pw", b"0123456789abcdef", 4096);
    let first = |mech: &str, data: &str| {
        ScramServer::with_channel_binding(v.clone(), true, tls())
            .handle_client_first(mech, data.as_bytes())
    };
    assert!(matches!(
        first(MECHANISM_PLUS, "n,,n=,r=abc"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(
        first(MECHANISM_PLUS, "y,,n=,r=abc"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(
        first(MECHANISM, "p=tls-server-end-point,,n=,r=abc"),
        Err(ScramError::Malformed(_))
    ));
    assert!(matches!(
        first(MECHANISM_PLUS, "p=tls-unique,,n=,r=abc"),
        Err(ScramError::ChannelBindingUnsupported)
    ));
    assert!(matches!(
        first(MECHANISM_PLUS, "p=,,n=,r=abc"),
        Err(ScramError::ChannelBindingUnsupported)
    ));
    first(MECHANISM_PLUS, "p=tls-server-end-point,,n=,r=abc").unwrap();
    first(MECHANISM, "n,,n=,r=abc").unwrap();
}
