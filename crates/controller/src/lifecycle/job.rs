//! Jobs GitHub tells us of, and which pool runs them.
//!
//! A `workflow_job` delivery moves a job along `queued`/`waiting` → `in_progress` →
//! `completed`. Deliveries arrive late, twice or out of order, so a job only ever moves
//! forward ([`job_may_move`], which the store applies to every write of a job, as it
//! applies the command table), and the delivery's `action` is what counts, never its
//! `status` field.
//!
//! A job is **matched to a pool** when its `runs-on` labels (case-insensitively) are all
//! among the pool's labels. When several pools match, the **most specific** one wins: the
//! pool with the fewest labels (the least it offers beyond what the job asked for); a tie
//! goes to the pool id that sorts first, so the choice is stable.

use crate::model::{JobRecord, Millis};

/// Where a job is, from a `workflow_job` delivery's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    /// Waiting on an environment's protection rules: no runner can take it yet.
    Waiting,
    InProgress,
    Completed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Waiting => "waiting",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "waiting" => JobStatus::Waiting,
            "in_progress" => JobStatus::InProgress,
            "completed" => JobStatus::Completed,
            _ => return None,
        })
    }

    /// How far along: `queued` and `waiting` are one step (a job waits, is approved and is
    /// queued again), then `in_progress`, then `completed`.
    fn rank(self) -> u8 {
        match self {
            JobStatus::Queued | JobStatus::Waiting => 0,
            JobStatus::InProgress => 1,
            JobStatus::Completed => 2,
        }
    }
}

/// May a stored job at `from` be written at `to`? Only forward, or between `queued` and
/// `waiting`; an unknown stored status may be replaced.
pub fn job_may_move(from: &str, to: &str) -> bool {
    match (JobStatus::parse(from), JobStatus::parse(to)) {
        (Some(f), Some(t)) => t.rank() > f.rank() || (t.rank() == f.rank() && f != t),
        (None, Some(_)) => true,
        (_, None) => false,
    }
}

/// What one delivery says about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUpdate {
    pub job_id: i64,
    pub run_id: i64,
    pub run_attempt: i64,
    pub repository: String,
    pub name: String,
    pub workflow_name: Option<String>,
    pub labels: Vec<String>,
    pub status: JobStatus,
    pub conclusion: Option<String>,
    pub runner_name: Option<String>,
    /// GitHub's own times, when the delivery has them.
    pub created_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
}

/// The job after `update`, or `None` when it changes nothing (a repeat, or a late delivery
/// of an earlier step). `pool_id` is the pool [`match_pool`] chose for its labels; `vm_id`
/// is our VM the delivery's runner belongs to, if it is one of ours.
pub fn apply_job_update(
    existing: Option<&JobRecord>,
    update: &JobUpdate,
    pool_id: Option<String>,
    vm_id: Option<String>,
    now: Millis,
) -> Option<JobRecord> {
    let status = update.status.as_str();
    let mut job = match existing {
        Some(j) if !job_may_move(&j.status, status) => return None,
        Some(j) => j.clone(),
        None => JobRecord {
            job_id: update.job_id,
            run_id: update.run_id,
            run_attempt: update.run_attempt,
            repository: update.repository.clone(),
            name: update.name.clone(),
            workflow_name: update.workflow_name.clone(),
            labels: update.labels.clone(),
            status: String::new(),
            conclusion: None,
            pool_id,
            runner_name: None,
            vm_id: None,
            queued_at: update.created_at.unwrap_or(now).min(now),
            started_at: None,
            completed_at: None,
            updated_at: now,
        },
    };
    job.status = status.to_owned();
    job.updated_at = now;
    if let Some(r) = update.runner_name.as_deref().filter(|r| !r.is_empty()) {
        job.runner_name = Some(r.to_owned());
        job.vm_id = vm_id;
    }
    match update.status {
        JobStatus::InProgress => {
            job.started_at = Some(update.started_at.unwrap_or(now).min(now));
        }
        JobStatus::Completed => {
            job.started_at
                .get_or_insert(update.started_at.unwrap_or(now).min(now));
            job.completed_at = Some(update.completed_at.unwrap_or(now).min(now));
            job.conclusion = update.conclusion.clone();
        }
        JobStatus::Queued | JobStatus::Waiting => {}
    }
    Some(job)
}

/// How long a job waited for a runner (queued → in progress), once it started.
pub fn queue_time(job: &JobRecord) -> Option<Millis> {
    job.started_at.map(|s| (s - job.queued_at).max(0))
}

/// The `p`-th percentile (0 < p <= 100) of `values` by the nearest-rank rule; `None` for
/// none.
pub fn percentile(values: &[Millis], p: u32) -> Option<Millis> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = (u64::from(p.clamp(1, 100)) * v.len() as u64).div_ceil(100);
    v.get(
        usize::try_from(rank)
            .unwrap_or(usize::MAX)
            .saturating_sub(1),
    )
    .copied()
}

/// The pool that runs a job with `labels`: among `pools` (id and labels) whose labels hold
/// every one of the job's, the most specific (fewest labels; then the first id).
pub fn match_pool<'a>(
    labels: &[String],
    pools: impl IntoIterator<Item = (&'a str, &'a [String])>,
) -> Option<String> {
    let has = |pool: &[String], l: &String| pool.iter().any(|p| p.eq_ignore_ascii_case(l));
    pools
        .into_iter()
        .filter(|(_, pool)| labels.iter().all(|l| has(pool, l)))
        .min_by(|(a_id, a), (b_id, b)| a.len().cmp(&b.len()).then(a_id.cmp(b_id)))
        .map(|(id, _)| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(status: JobStatus) -> JobUpdate {
        JobUpdate {
            job_id: 7,
            run_id: 70,
            run_attempt: 1,
            repository: "acme/app".into(),
            name: "build".into(),
            workflow_name: Some("CI".into()),
            labels: vec!["self-hosted".into(), "linux".into()],
            status,
            conclusion: None,
            runner_name: None,
            created_at: Some(1_000),
            started_at: None,
            completed_at: None,
        }
    }

    const NO_VM: Option<String> = None;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 90), Some(7));
        let v: Vec<Millis> = (1..=10).rev().collect();
        assert_eq!(percentile(&v, 50), Some(5));
        assert_eq!(percentile(&v, 90), Some(9));
        assert_eq!(percentile(&v, 100), Some(10));
    }

    #[test]
    fn jobs_only_move_forward() {
        use JobStatus::*;
        for (from, to, ok) in [
            (Queued, Waiting, true),
            (Waiting, Queued, true),
            (Queued, InProgress, true),
            (Queued, Completed, true),
            (InProgress, Completed, true),
            (InProgress, Queued, false),
            (Completed, InProgress, false),
            (Completed, Queued, false),
            (Queued, Queued, false),
            (Completed, Completed, false),
        ] {
            assert_eq!(
                job_may_move(from.as_str(), to.as_str()),
                ok,
                "{from:?} -> {to:?}"
            );
        }
        assert!(job_may_move("bogus", "queued"));
        assert!(!job_may_move("queued", "bogus"));
    }

    #[test]
    fn a_job_is_followed_through_out_of_order_deliveries() {
        let queued = apply_job_update(
            None,
            &update(JobStatus::Queued),
            Some("p".into()),
            NO_VM,
            5_000,
        );
        let queued = queued.unwrap_or_else(|| panic!("new job"));
        assert_eq!(queued.queued_at, 1_000, "GitHub's created_at");
        assert_eq!(queued.pool_id.as_deref(), Some("p"));
        // The same delivery again: nothing.
        assert_eq!(
            apply_job_update(
                Some(&queued),
                &update(JobStatus::Queued),
                None,
                NO_VM,
                6_000
            ),
            None
        );
        let mut started = update(JobStatus::InProgress);
        started.runner_name = Some("vm-1-1".into());
        started.started_at = Some(9_000);
        let running = apply_job_update(
            Some(&queued),
            &started,
            None,
            Some("vm of vm-1-1".into()),
            10_000,
        )
        .unwrap_or_else(|| panic!("started"));
        assert_eq!(running.vm_id.as_deref(), Some("vm of vm-1-1"));
        assert_eq!(running.pool_id.as_deref(), Some("p"), "the pool stays");
        assert_eq!(queue_time(&running), Some(8_000));
        // A late `queued` after it started changes nothing.
        assert_eq!(
            apply_job_update(
                Some(&running),
                &update(JobStatus::Queued),
                None,
                NO_VM,
                11_000
            ),
            None
        );
        // `completed` before `in_progress` was ever seen: started then, too.
        let mut done = update(JobStatus::Completed);
        done.conclusion = Some("success".into());
        let finished = apply_job_update(Some(&queued), &done, None, NO_VM, 12_000)
            .unwrap_or_else(|| panic!("completed"));
        assert_eq!(finished.started_at, Some(12_000));
        assert_eq!(finished.completed_at, Some(12_000));
        assert_eq!(finished.conclusion.as_deref(), Some("success"));
        // A clock ahead of ours never makes a time in the future.
        let mut early = update(JobStatus::Queued);
        early.created_at = Some(99_000);
        let j = apply_job_update(None, &early, None, NO_VM, 5_000).unwrap_or_else(|| panic!("new"));
        assert_eq!(j.queued_at, 5_000);
    }

    #[test]
    fn the_most_specific_matching_pool_runs_a_job() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<String>>();
        let general = s(&["self-hosted", "linux", "x64"]);
        let gpu = s(&["self-hosted", "linux", "x64", "gpu"]);
        let big = s(&["self-hosted", "linux", "x64", "gpu", "big"]);
        let arm = s(&["self-hosted", "linux", "arm64"]);
        let pools = || {
            [
                ("general", general.as_slice()),
                ("gpu", gpu.as_slice()),
                ("big", big.as_slice()),
                ("arm", arm.as_slice()),
            ]
        };
        assert_eq!(
            match_pool(&s(&["self-hosted", "Linux"]), pools()).as_deref(),
            Some("arm"),
            "fewest labels; ties by id"
        );
        assert_eq!(
            match_pool(&s(&["self-hosted", "x64"]), pools()).as_deref(),
            Some("general")
        );
        assert_eq!(match_pool(&s(&["gpu"]), pools()).as_deref(), Some("gpu"));
        assert_eq!(
            match_pool(&s(&["gpu", "big"]), pools()).as_deref(),
            Some("big")
        );
        assert_eq!(match_pool(&s(&["windows"]), pools()), None);
        assert_eq!(
            match_pool(&s(&["ubuntu-latest"]), pools()),
            None,
            "a GitHub-hosted label"
        );
    }
}
