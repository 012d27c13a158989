//! A panic on any thread of a worker ends the process with `EXIT_PANIC`: this test re-runs
//! itself as a child process that installs the worker's panic handling and panics on a
//! thread other than the main one, as a rank or engine thread would.

use std::process::Command;

const CHILD: &str = "WHALEFLUX_TEST_PANIC_CHILD";

#[test]
fn a_panic_on_a_rank_thread_ends_the_process_with_exit_panic() {
    if std::env::var_os(CHILD).is_some() {
        whaleflux_worker::bringup::exit_on_panic();
        let t = std::thread::Builder::new()
            .name("wf-rank-1-0".into())
            .spawn(|| panic!("a rank thread failed"))
            .expect("thread");
        let _ = t.join();
        // Never reached: the hook exits before the join returns.
        std::thread::sleep(std::time::Duration::from_secs(30));
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_panic_on_a_rank_thread_ends_the_process_with_exit_panic",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .expect("child runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(whaleflux_crds::worker::EXIT_PANIC),
        "{err}"
    );
    assert!(err.contains("a rank thread failed"), "{err}");
}
