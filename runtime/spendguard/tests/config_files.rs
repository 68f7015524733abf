//! `config/<component>.env` is the reference of every environment variable a component reads
//! (docs point operators at it). Each variable a flag of `spendguard ledger`, `sidecar`,
//! `operator` or `worker …` takes must appear there, so a new flag cannot ship undocumented.

use clap::{Args, Command};

/// The environment variables of every flag of `A`.
fn env_vars<A: Args>() -> Vec<String> {
    A::augment_args(Command::new("component"))
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect()
}

fn assert_listed(file: &str, vars: &[String]) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/").to_owned() + file;
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim()))
        .collect();
    let missing: Vec<&String> = vars
        .iter()
        .filter(|var| !listed.contains(&var.as_str()))
        .collect();
    assert!(missing.is_empty(), "{file} does not list {missing:?}");
}

#[test]
fn every_environment_variable_is_in_its_reference_file() {
    assert_listed("ledger.env", &env_vars::<spendguard_ledger::LedgerArgs>());
    assert_listed(
        "sidecar.env",
        &env_vars::<spendguard_sidecar::SidecarArgs>(),
    );
    assert_listed(
        "operator.env",
        &env_vars::<spendguard_operator::OperatorArgs>(),
    );
    let mut workers = env_vars::<spendguard_workers::ForwarderArgs>();
    workers.extend(env_vars::<spendguard_workers::SweeperArgs>());
    assert_listed("workers.env", &workers);
}
