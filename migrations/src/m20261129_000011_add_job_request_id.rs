//! A job remembers the `x-request-id` of the request that created it: the worker logs it
//! with the job's outcome, so one id finds a job's lines in the API's and the worker's logs.

sql_migration!("ALTER TABLE jobs ADD COLUMN request_id text");
