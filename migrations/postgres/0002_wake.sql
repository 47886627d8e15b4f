-- Nodes wait on NOTIFY, not on a poll: a job that becomes runnable (submitted, retried,
-- handed back, recovered) wakes every listening node once per transaction (PostgreSQL folds
-- equal notifications of one transaction into one, delivered at its commit).

CREATE FUNCTION aip_job_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('aip_jobs', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_wake AFTER INSERT OR UPDATE OF status ON jobs
FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION aip_job_queued();
