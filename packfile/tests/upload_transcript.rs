//! Byte-transcript tests: advertisements, negotiation rounds (including
//! the stateless smart-HTTP style) and error replies are compared with
//! what stock `git upload-pack` answers to the very same request bytes.

#[path = "upload_helpers.rs"]
mod helpers;

use std::path::Path;
use std::process::Output;

use cairn_packfile::refs::RepoRefs;
use cairn_packfile::store::PackSet;
use cairn_packfile::upload::{
    advertise_v0, advertise_v2, serve_v0, serve_v2, UploadContext, UploadError,
};
use helpers::{pkt_lines, request, Fixture};

struct Repo {
    fx: Fixture,
    bare: std::path::PathBuf,
    refs: RepoRefs,
    packs: PackSet,
    agent: String,
}

fn repo() -> Repo {
    let fx = Fixture::new();
    let src = fx.history("src", 8);
    let bare = fx.path("srv.git");
    fx.publish(&src, &bare);
    for (k, v) in [
        ("uploadpack.allowTipSHA1InWant", "true"),
        ("uploadpack.allowReachableSHA1InWant", "true"),
    ] {
        fx.git(&bare, &["config", k, v]);
    }
    let (refs, packs) = helpers::open_repo(&bare);
    let version = fx.git(&bare, &["version"]);
    let agent = format!("git/{}", version.trim_start_matches("git version "));
    Repo {
        fx,
        bare,
        refs,
        packs,
        agent,
    }
}

impl Repo {
    fn ctx(&self) -> UploadContext<'_> {
        UploadContext {
            refs: &self.refs,
            packs: &self.packs,
            agent: &self.agent,
        }
    }

    fn rev(&self, spec: &str) -> String {
        self.fx.git(&self.bare, &["rev-parse", spec])
    }

    /// Stock git's answer to `input` in stateless mode.
    fn git_stateless(&self, v2: bool, input: &[u8]) -> Vec<u8> {
        self.git_stateless_output(v2, input).stdout
    }

    /// Like [`Repo::git_stateless`], with exit status and stderr.
    fn git_stateless_output(&self, v2: bool, input: &[u8]) -> Output {
        let envs: &[(&str, &str)] = if v2 {
            &[("GIT_PROTOCOL", "version=2")]
        } else {
            &[]
        };
        let bare = self.bare.to_str().expect("utf8");
        self.fx.run(
            Path::new("/"),
            &["upload-pack", "--stateless-rpc", bare],
            envs,
            input,
        )
    }

    /// Asserts that we refuse `input` with a single `ERR` line naming
    /// `feature` and nothing after it (no pack), and that stock git refuses
    /// it too: it answers some of these with `ERR`, others only on stderr.
    fn refused_like_git(&self, v2: bool, input: &[u8], feature: &str) {
        let (out, res) = self.ours(v2, input);
        let err = res.expect_err(feature);
        let lines = pkt_lines(&out);
        assert_eq!(lines.len(), 1, "{feature}: {err}: {lines:?}");
        assert!(
            lines[0].starts_with("ERR upload-pack: ") && lines[0].contains(feature),
            "{feature}: the error must name it: {lines:?}"
        );
        // Exactly one pkt-line: nothing follows the ERR line.
        assert_eq!(out.len(), 4 + lines[0].len(), "{feature}: {out:?}");

        let git = self.git_stateless_output(v2, input);
        let stderr = String::from_utf8_lossy(&git.stderr);
        let git_lines = pkt_lines(&git.stdout);
        assert!(!git.status.success(), "{feature}: git accepted it");
        assert!(
            git.stdout.is_empty()
                || git_lines.len() == 1
                    && git_lines[0].starts_with("ERR ")
                    && git_lines[0].contains(feature),
            "{feature}: git answered {git_lines:?}"
        );
        assert!(stderr.contains(feature), "{feature}: git said {stderr}");
    }

    fn ours(&self, v2: bool, input: &[u8]) -> (Vec<u8>, Result<(), UploadError>) {
        let mut out = Vec::new();
        let mut inp = input;
        let res = if v2 {
            serve_v2(&self.ctx(), &mut inp, &mut out, true)
        } else {
            serve_v0(&self.ctx(), &mut inp, &mut out, true)
        };
        (out, res)
    }

    /// Asserts that our reply equals git's up to the start of the pack.
    fn same_as_git(&self, v2: bool, input: &[u8]) -> Vec<String> {
        let (ours, res) = self.ours(v2, input);
        res.expect("request is valid");
        let git = self.git_stateless(v2, input);
        let (a, b) = (pkt_lines(&ours), pkt_lines(&git));
        assert_eq!(a, b, "reply differs from git's");
        a
    }
}

#[test]
fn v0_and_v1_advertisement_match_git() {
    let r = repo();
    for v1 in [false, true] {
        let mut ours = Vec::new();
        advertise_v0(&r.ctx(), v1, &mut ours).expect("advertise");
        let envs: &[(&str, &str)] = if v1 {
            &[("GIT_PROTOCOL", "version=1")]
        } else {
            &[]
        };
        let bare = r.bare.to_str().expect("utf8");
        let git =
            r.fx.run(
                Path::new("/"),
                &["upload-pack", "--advertise-refs", bare],
                envs,
                b"",
            )
            .stdout;
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&git)
        );
    }
}

#[test]
fn empty_repository_advertisement_matches_git() {
    let fx = Fixture::new();
    let bare = fx.path("empty.git");
    fx.git(
        fx.dir.path(),
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            bare.to_str().expect("utf8"),
        ],
    );
    fx.git(&bare, &["config", "uploadpack.allowTipSHA1InWant", "true"]);
    fx.git(
        &bare,
        &["config", "uploadpack.allowReachableSHA1InWant", "true"],
    );
    fx.git(&bare, &["config", "uploadpack.allowFilter", "true"]);
    let version = fx.git(&bare, &["version"]);
    let agent = format!("git/{}", version.trim_start_matches("git version "));
    let refs = RepoRefs::new(Vec::new(), Some("refs/heads/main".into()));
    let packs = PackSet::default();
    let ctx = UploadContext {
        refs: &refs,
        packs: &packs,
        agent: &agent,
    };
    let mut ours = Vec::new();
    advertise_v0(&ctx, false, &mut ours).expect("advertise");
    let git = fx
        .run(
            Path::new("/"),
            &[
                "upload-pack",
                "--advertise-refs",
                bare.to_str().expect("utf8"),
            ],
            &[],
            b"",
        )
        .stdout;
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&git)
    );
}

#[test]
fn v2_capabilities_match_git() {
    let r = repo();
    let mut ours = Vec::new();
    advertise_v2(&r.ctx(), &mut ours).expect("advertise");
    let bare = r.bare.to_str().expect("utf8");
    let git =
        r.fx.run(
            Path::new("/"),
            &["upload-pack", "--advertise-refs", bare],
            &[("GIT_PROTOCOL", "version=2")],
            b"",
        )
        .stdout;
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&git)
    );
}

#[test]
fn stateless_v0_negotiation_rounds_match_git() {
    let r = repo();
    let tip = r.rev("main");
    let old = r.rev("main~4");
    let older = r.rev("main~5");
    let side = r.rev("side");
    let unknown = "1111111111111111111111111111111111111111";
    let caps_detailed =
        "multi_ack_detailed no-done side-band-64k thin-pack ofs-delta agent=git/2.47.3";
    for caps in [
        caps_detailed,
        "multi_ack_detailed side-band-64k ofs-delta",
        "multi_ack side-band-64k",
        "side-band-64k",
    ] {
        let want = format!("want {tip} {caps}");
        // A round of haves ending in a flush: ACK/NAK lines only.
        let round = request(&[
            &want,
            "0000",
            &format!("have {unknown}"),
            &format!("have {old}"),
            &format!("have {older}"),
            "0000",
        ]);
        let lines = r.same_as_git(false, &round);
        assert!(
            lines.contains(&"NAK\n".to_owned()) || lines.iter().any(|l| l.starts_with("ACK")),
            "{lines:?}"
        );
        // Only unknown haves.
        r.same_as_git(
            false,
            &request(&[&want, "0000", &format!("have {unknown}"), "0000"]),
        );
        // Final round with done: acknowledgements, then the pack.
        let done = request(&[
            &want,
            "0000",
            &format!("have {side}"),
            &format!("have {old}"),
            "done",
        ]);
        let lines = r.same_as_git(false, &done);
        assert_eq!(
            lines.last().map(String::as_str),
            Some("<pack>"),
            "{caps}: {lines:?}"
        );
    }
    // Clone-style request: no haves at all.
    let lines = r.same_as_git(
        false,
        &request(&[&format!("want {tip} {caps_detailed}"), "0000", "done"]),
    );
    assert_eq!(lines, vec!["NAK\n".to_owned(), "<pack>".to_owned()]);
    // A request that only announces it wants nothing.
    assert!(r.ours(false, b"0000").0.is_empty());
}

#[test]
fn stateless_v0_shallow_request_matches_git() {
    let r = repo();
    let tip = r.rev("main");
    let shallow_at = r.rev("main~2");
    let want = format!("want {tip} multi_ack_detailed no-done side-band-64k thin-pack ofs-delta");
    // First HTTP round of `fetch --depth`: only the shallow list comes back.
    r.same_as_git(false, &request(&[&want, "deepen 2", "0000"]));
    r.same_as_git(
        false,
        &request(&[
            &want,
            &format!("shallow {shallow_at}"),
            "deepen 4",
            "0000",
            "done",
        ]),
    );
    r.same_as_git(
        false,
        &request(&[&want, "deepen-since 1578441600", "0000", "done"]),
    );
    r.same_as_git(false, &request(&[&want, "deepen-not v1", "0000", "done"]));
}

#[test]
fn v2_ls_refs_matches_git() {
    let r = repo();
    for args in [
        vec![],
        vec!["symrefs", "peel", "unborn"],
        vec!["peel", "ref-prefix refs/tags/"],
        vec!["symrefs", "ref-prefix HEAD", "ref-prefix refs/heads/"],
    ] {
        let mut lines = vec![
            "command=ls-refs",
            "agent=git/2.47.3",
            "object-format=sha1",
            "0001",
        ];
        lines.extend(args.iter().copied());
        lines.push("0000");
        r.same_as_git(true, &request(&lines));
    }
}

#[test]
fn v2_fetch_sections_match_git() {
    let r = repo();
    let tip = r.rev("main");
    let old = r.rev("main~3");
    let unknown = "2222222222222222222222222222222222222222";
    let head = [
        "command=fetch",
        "agent=git/2.47.3",
        "object-format=sha1",
        "0001",
        "thin-pack",
        "ofs-delta",
    ];
    let with = |extra: &[&str]| {
        let mut l: Vec<&str> = head.to_vec();
        l.extend_from_slice(extra);
        l.push("0000");
        request(&l)
    };
    let want = format!("want {tip}");
    let have_old = format!("have {old}");
    let have_unknown = format!("have {unknown}");
    // Unknown haves only: acknowledgments with NAK, then flush.
    let l = r.same_as_git(true, &with(&[&want, &have_unknown]));
    assert_eq!(l, vec!["acknowledgments\n", "NAK\n", "0000"]);
    // A common have covering the want: ready, then the pack.
    let l = r.same_as_git(true, &with(&[&want, &have_unknown, &have_old]));
    assert_eq!(
        l[..4],
        [
            "acknowledgments\n",
            &format!("ACK {old}\n"),
            "ready\n",
            "0001"
        ]
    );
    assert_eq!(l.last().map(String::as_str), Some("<pack>"));
    // wait-for-done holds the pack back.
    r.same_as_git(true, &with(&[&want, &have_old, "wait-for-done"]));
    // done: straight to the packfile section.
    let l = r.same_as_git(true, &with(&[&want, &have_old, "done"]));
    assert_eq!(l[0], "packfile\n");
    // Shallow info section.
    let l = r.same_as_git(true, &with(&[&want, "deepen 1", "done"]));
    assert_eq!(
        l[..3],
        ["shallow-info\n", &format!("shallow {tip}"), "0001"]
    );
    // Any object may be wanted in v2, e.g. a single blob.
    let blob = r.rev("main:README.md");
    let l = r.same_as_git(
        true,
        &with(&[&format!("want {blob}"), "filter blob:none", "done"]),
    );
    assert_eq!(l, vec!["packfile\n", "<pack>"]);
}

#[test]
fn bad_requests_get_errors_like_git() {
    let r = repo();
    let unknown = "1234567890123456789012345678901234567890";
    // Unknown want: the same ERR line git sends.
    let req = request(&[&format!("want {unknown} side-band-64k"), "0000", "done"]);
    let (ours, res) = r.ours(false, &req);
    assert!(matches!(res, Err(UploadError::NotOurRef { .. })));
    assert_eq!(ours, r.git_stateless(false, &req));

    // A commit that exists but no ref reaches.
    let tree = r.rev("main^{tree}");
    let dangling = r.fx.git(&r.bare, &["commit-tree", &tree, "-m", "dangling"]);
    r.fx.git(&r.bare, &["update-ref", "refs/tmp/x", &dangling]);
    r.fx.git(&r.bare, &["repack", "-a", "-d", "-q"]);
    r.fx.git(&r.bare, &["update-ref", "-d", "refs/tmp/x"]);
    let (refs, packs) = helpers::open_repo(&r.bare);
    let ctx = UploadContext {
        refs: &refs,
        packs: &packs,
        agent: "cairn/test",
    };
    let req = request(&[&format!("want {dangling} side-band-64k"), "0000", "done"]);
    let mut out = Vec::new();
    let res = serve_v0(&ctx, &mut &req[..], &mut out, true);
    assert!(matches!(res, Err(UploadError::NotOurRef { .. })), "{res:?}");
    assert_eq!(
        pkt_lines(&out),
        vec![format!("ERR upload-pack: not our ref {dangling}")]
    );
    // ... but v2 permits it.
    let v2 = request(&[
        "command=fetch",
        "0001",
        &format!("want {dangling}"),
        "done",
        "0000",
    ]);
    let mut out = Vec::new();
    serve_v2(&ctx, &mut &v2[..], &mut out, true).expect("v2 allows any object");
    assert_eq!(pkt_lines(&out), vec!["packfile\n", "<pack>"]);

    // Garbage framing, oversized lines, unknown lines and commands.
    let tip = r.rev("main");
    let cases: Vec<(bool, Vec<u8>)> = vec![
        (false, b"zzzz".to_vec()),
        (false, b"fff0want".to_vec()),
        (
            false,
            request(&[&format!("want {tip}"), "hello there", "0000"]),
        ),
        (
            false,
            request(&[&format!("want {tip}"), "0000", "have nothex", "0000"]),
        ),
        (
            false,
            request(&[&format!("want {tip}"), "filter sparse:oid=abc", "0000"]),
        ),
        (true, request(&["command=frobnicate", "0000"])),
        (
            true,
            request(&["command=fetch", "0001", "want-ref refs/heads/main", "0000"]),
        ),
        (
            true,
            request(&["command=fetch", "bogus-capability", "0000"]),
        ),
        (
            true,
            request(&["command=ls-refs", "object-format=sha256", "0000"]),
        ),
    ];
    for (v2, input) in cases {
        let (out, res) = r.ours(v2, &input);
        let err = res.expect_err("must be rejected");
        let lines = pkt_lines(&out);
        assert_eq!(lines.len(), 1, "{err}: {lines:?}");
        assert!(lines[0].starts_with("ERR upload-pack: "), "{lines:?}");
    }

    // What docs/protocol-status.md lists as "not advertised; a clear error
    // if sent". First: not advertised, in v0 nor in v2.
    let mut adv = Vec::new();
    advertise_v0(&r.ctx(), false, &mut adv).expect("advertise");
    advertise_v2(&r.ctx(), &mut adv).expect("advertise");
    let adv = String::from_utf8_lossy(&adv);
    for cap in [
        "object-info",
        "packfile-uris",
        "sideband-all",
        "ref-in-want",
    ] {
        assert!(!adv.contains(cap), "{cap} is advertised: {adv}");
    }
    // Stock git gets the same position: only the filters we implement.
    for (k, v) in [
        ("uploadpackfilter.allow", "false"),
        ("uploadpackfilter.blob:none.allow", "true"),
        ("uploadpackfilter.blob:limit.allow", "true"),
        ("uploadpackfilter.tree.allow", "true"),
    ] {
        r.fx.git(&r.bare, &["config", k, v]);
    }
    // Each request is valid but for the one feature, so the refusal can
    // only be about that feature.
    let want = format!("want {tip}");
    let want_v0 = format!("want {tip} side-band-64k ofs-delta filter");
    let fetch_with = |line: &str| {
        request(&[
            "command=fetch",
            "agent=git/2.47.3",
            "object-format=sha1",
            "0001",
            &want,
            line,
            "done",
            "0000",
        ])
    };
    // The control: with a supported line instead, both send a pack.
    for v2 in [true, false] {
        let req = if v2 {
            fetch_with("filter blob:none")
        } else {
            request(&[&want_v0, "filter blob:none", "0000", "done"])
        };
        let l = r.same_as_git(v2, &req);
        assert_eq!(l.last().map(String::as_str), Some("<pack>"), "{l:?}");
    }
    r.refused_like_git(
        true,
        &request(&[
            "command=object-info",
            "agent=git/2.47.3",
            "object-format=sha1",
            "0001",
            "size",
            &format!("oid {tip}"),
            "0000",
        ]),
        "object-info",
    );
    r.refused_like_git(true, &fetch_with("packfile-uris https"), "packfile-uris");
    r.refused_like_git(true, &fetch_with("sideband-all"), "sideband-all");
    r.refused_like_git(
        true,
        &request(&[
            "command=fetch",
            "0001",
            "want-ref refs/heads/main",
            "done",
            "0000",
        ]),
        "want-ref",
    );
    let combine = "filter combine:blob:none+tree:1";
    let sparse = "filter sparse:oid=main:README.md";
    r.refused_like_git(true, &fetch_with(combine), "combine");
    r.refused_like_git(true, &fetch_with(sparse), "sparse:oid");
    // v0 with the filter capability negotiated.
    for (line, feature) in [(combine, "combine"), (sparse, "sparse:oid")] {
        r.refused_like_git(false, &request(&[&want_v0, line, "0000", "done"]), feature);
    }
}

#[test]
fn v2_session_serves_several_commands() {
    let r = repo();
    let tip = r.rev("main");
    let mut input = request(&["command=ls-refs", "0001", "ref-prefix refs/heads/", "0000"]);
    input.extend(request(&[
        "command=fetch",
        "0001",
        &format!("want {tip}"),
        "done",
        "0000",
    ]));
    input.extend_from_slice(b"0000");
    let mut out = Vec::new();
    serve_v2(&r.ctx(), &mut &input[..], &mut out, false).expect("session");
    let lines = pkt_lines(&out);
    assert_eq!(lines[lines.len() - 2..], ["packfile\n", "<pack>"]);
    assert!(lines[0].ends_with(" refs/heads/main\n"));
}
