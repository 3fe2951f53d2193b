%% Load generator for `cargo bench --bench e2e`: a receiver that acks every
%% 1000 messages and answers pings, a sender with a bounded credit window,
%% and a ping-pong round-trip measurement. Compiled at bench start.
-module(wandist_bench).
-export([receiver/0, stream/4, plain/3, pingpong/2, round_trips/2]).

-define(ACK_EVERY, 1000).

receiver() ->
    spawn(fun() -> loop(0) end).

loop(N) ->
    receive
        {msg, From, _Bin} ->
            N1 = N + 1,
            case N1 rem ?ACK_EVERY of
                0 -> From ! {ack, N1};
                _ -> ok
            end,
            loop(N1);
        {ping, From} ->
            From ! pong,
            loop(N);
        {count, From} ->
            From ! {count, N},
            loop(N);
        reset ->
            loop(0)
    end.

%% Sends N messages carrying Bin, at most Window unacknowledged; returns
%% the elapsed microseconds. The receiver counts from 0 again first (it
%% acks with its running count: without the reset, a stream after another
%% took the earlier stream's count as acks and stopped early).
stream(R, N, Bin, Window) ->
    R ! reset,
    T0 = erlang:monotonic_time(microsecond),
    send(R, N, Bin, Window, 0, 0),
    erlang:monotonic_time(microsecond) - T0.

send(_R, N, _Bin, _W, _Sent, Acked) when Acked >= N ->
    ok;
send(R, N, Bin, W, Sent, Acked) when Sent < N, Sent - Acked < W ->
    R ! {msg, self(), Bin},
    send(R, N, Bin, W, Sent + 1, Acked);
send(R, N, Bin, W, Sent, _Acked) ->
    receive
        {ack, A} -> send(R, N, Bin, W, Sent, A)
    after 30000 -> exit(stalled)
    end.

%% A plain sender: N messages with `!` as fast as it goes, no window,
%% then a question whose answer says how many the receiver has taken
%% (messages between one pair arrive in order); returns the elapsed
%% microseconds, or exits if any message was lost on the way.
plain(R, N, Bin) ->
    R ! reset,
    T0 = erlang:monotonic_time(microsecond),
    plain_send(R, N, Bin),
    R ! {count, self()},
    Got = receive {count, C} -> C after 120000 -> exit(stalled) end,
    T = erlang:monotonic_time(microsecond) - T0,
    flush_acks(),
    case Got of
        N -> T;
        _ -> exit({lost, N - Got})
    end.

plain_send(_R, 0, _Bin) -> ok;
plain_send(R, N, Bin) ->
    R ! {msg, self(), Bin},
    plain_send(R, N - 1, Bin).

flush_acks() ->
    receive {ack, _} -> flush_acks() after 0 -> ok end.

%% K round trips; returns {P50, P99} in microseconds.
pingpong(R, K) ->
    S = lists:sort(round_trips(R, K)),
    {lists:nth(max(1, K div 2), S), lists:nth(max(1, K * 99 div 100), S)}.

%% K round trips; returns each in microseconds (the bench pools them
%% across blocks and paths taken in turn).
round_trips(R, K) ->
    [one_ping(R) || _ <- lists:seq(1, K)].

one_ping(R) ->
    T = erlang:monotonic_time(nanosecond),
    R ! {ping, self()},
    receive pong -> (erlang:monotonic_time(nanosecond) - T) / 1000 end.
