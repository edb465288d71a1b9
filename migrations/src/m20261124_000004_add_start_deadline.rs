//! A job may carry a time-to-start deadline: past it, a worker fails the job with
//! `deadline_exceeded` instead of running it.

sql_migration!("ALTER TABLE jobs ADD COLUMN start_deadline timestamptz");
