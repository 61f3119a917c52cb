use cairn_tests::*;
use std::time::Instant;
#[test]
fn tmp() -> Result<()> {
    let git = Git::new()?;
    let t = Instant::now();
    let src = git.init_bare(git.scratch("src"))?;
    let mut gen = HistoryGen::new(42, 6, 300);
    gen.import(&src, "main", 3000)?;
    eprintln!("gen {:?}", t.elapsed());
    let stock = git.init_bare(git.scratch("stock"))?;
    let stock_url = format!("file://{}", stock.path.display());
    let t = Instant::now();
    src.run(["push", "-q", &stock_url, "main"])?;
    eprintln!("push {:?} {:?}", t.elapsed(), stock.pack_files()?);
    let g2 = git.with_protocol(2);
    let d = g2.scratch("c");
    let t = Instant::now();
    let (_, s) = received_pack_size(
        &g2,
        g2.cmd(g2.home()).args([
            "clone",
            "-q",
            "--no-local",
            &stock_url,
            &d.display().to_string(),
        ]),
    )?;
    eprintln!("clone {s} {:?}", t.elapsed());
    let c = g2.repo(&d);
    let t = Instant::now();
    c.assert_fsck_clean()?;
    eprintln!("fsck {:?}", t.elapsed());
    gen.import(&src, "main", 50)?;
    src.run(["push", "-q", &stock_url, "main"])?;
    let (_, s) = received_pack_size(&g2, c.cmd().args(["fetch", "-q", "origin"]))?;
    eprintln!("fetch {s}");
    let g0 = git.with_protocol(0);
    let d = g0.scratch("c0");
    let (_, s) = received_pack_size(
        &g0,
        g0.cmd(g0.home()).args([
            "clone",
            "-q",
            "--no-local",
            &stock_url,
            &d.display().to_string(),
        ]),
    )?;
    eprintln!("clone v0 {s}");
    Ok(())
}
