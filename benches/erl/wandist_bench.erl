%% Load generator for `cargo bench --bench e2e`: a receiver that acks every
%% 1000 messages and answers pings, a sender with a bounded credit window,
%% and a ping-pong round-trip measurement. Compiled at bench start.
-module(wandist_bench).
-export([receiver/0, stream/4, plain/3, pingpong/2, round_trips/2]).
-export([payloads/3, stream_list/3, dump/2]).

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

%% ---- Payloads that look like real traffic (`cargo bench --bench wan`) ----

%% N messages of a kind, the same for a seed on every node:
%% chat: chat messages as maps (binaries, atoms, integers; 200 B - 2 KiB);
%% records: term_to_binary of typical records holding lists (a sender that
%% serializes its own); random: 1 KiB of random bytes (what compression
%% cannot shrink: already compressed or encrypted data).
payloads(Kind, N, Seed) ->
    rand:seed(exsss, {Seed, 17, 31}),
    list_to_tuple([payload(Kind, I) || I <- lists:seq(1, N)]).

payload(chat, I) ->
    Text = text(100 + rand:uniform(1700)),
    #{type => message,
      id => 100000000 + I,
      room => {room, rand:uniform(300)},
      from => #{id => rand:uniform(5000000), name => name(), locale => pick({<<"en_US">>, <<"pt_BR">>, <<"de_DE">>, <<"hi_IN">>})},
      sent_at => 1764600000000 + I * 53,
      text => Text,
      reply_to => case rand:uniform(4) of 1 -> 100000000 + rand:uniform(I); _ -> undefined end,
      attachments => case rand:uniform(6) of
                         1 -> [#{kind => image, url => <<"https://cdn.example.com/i/", (hex(12))/binary, ".jpg">>,
                                 bytes => rand:uniform(4000000), width => 1280, height => 720}];
                         _ -> []
                     end,
      client_nonce => rand:bytes(12),
      delivery => pick({normal, normal, normal, silent})};
payload(records, I) ->
    Lines = [{line, <<"SKU-", (integer_to_binary(rand:uniform(99999)))/binary>>, rand:uniform(5), 99 + rand:uniform(20000),
              pick({standard, standard, express, gift_wrap})}
             || _ <- lists:seq(1, rand:uniform(12))],
    Order = {order, 500000 + I, rand:uniform(2000000), pick({placed, paid, shipped, delivered, cancelled}), Lines,
             {address, text(20 + rand:uniform(30)), pick({<<"Lisbon">>, <<"Berlin">>, <<"Austin">>, <<"Pune">>, <<"Osaka">>}),
              integer_to_binary(10000 + rand:uniform(89999)), pick({pt, de, us, in, jp})},
             1764600000 + I * 7, [pick({priority, repeat_customer, first_order, b2b, promo}) || _ <- lists:seq(1, rand:uniform(3))],
             #{currency => pick({eur, usd, inr, jpy}), tax_cents => rand:uniform(3000), notes => text(rand:uniform(200))}},
    Presence = [{presence, rand:uniform(5000000), pick({online, away, busy, offline}), 1764600000 + I, pick({ios, android, web})}
                || _ <- lists:seq(1, rand:uniform(10))],
    term_to_binary(case I rem 3 of 0 -> {presence_batch, Presence}; _ -> Order end);
payload(random, _I) ->
    rand:bytes(1024).

-define(WORDS, {<<"the">>, <<"to">>, <<"and">>, <<"you">>, <<"I">>, <<"a">>, <<"it">>, <<"is">>, <<"that">>, <<"for">>,
                <<"we">>, <<"on">>, <<"this">>, <<"be">>, <<"have">>, <<"with">>, <<"are">>, <<"not">>, <<"can">>, <<"will">>,
                <<"do">>, <<"just">>, <<"so">>, <<"at">>, <<"what">>, <<"if">>, <<"but">>, <<"me">>, <<"my">>, <<"all">>,
                <<"tomorrow">>, <<"meeting">>, <<"deploy">>, <<"thanks">>, <<"sounds">>, <<"good">>, <<"later">>, <<"today">>,
                <<"order">>, <<"cluster">>, <<"please">>, <<"check">>, <<"again">>, <<"sorry">>, <<"dinner">>, <<"weekend">>,
                <<"photo">>, <<"call">>, <<"minutes">>, <<"review">>, <<"release">>, <<"ticket">>, <<"coffee">>, <<"train">>,
                <<"office">>, <<"team">>, <<"update">>, <<"working">>, <<"problem">>, <<"morning">>, <<"evening">>,
                <<"probably">>, <<"anyone">>, <<"wandered">>, <<"latency">>, <<"birthday">>, <<"Lisbon">>, <<"Berlin">>,
                <<"amazing">>, <<"honestly">>, <<"schedule">>, <<"customer">>, <<"invoice">>, <<"payment">>, <<"flight">>,
                <<"groceries">>, <<"yesterday">>, <<"football">>, <<"concert">>, <<"kids">>, <<"school">>, <<"ok">>,
                <<"lol">>, <<"yes">>, <<"no">>, <<"maybe">>, <<"when">>, <<"where">>, <<"why">>, <<"how">>, <<"who">>}).

%% Words drawn with a skew toward the common ones, as text has them;
%% now and then a number or a word of random letters (names, codes).
text(Len) -> text(Len, []).
text(Len, Acc) when Len =< 0 -> iolist_to_binary(lists:join(<<" ">>, lists:reverse(Acc)));
text(Len, Acc) ->
    W = case rand:uniform(12) of
            1 -> integer_to_binary(rand:uniform(100000));
            2 -> << <<($a + rand:uniform(26) - 1)>> || _ <- lists:seq(1, 3 + rand:uniform(6)) >>;
            _ -> element(1 + trunc(tuple_size(?WORDS) * math:pow(rand:uniform(), 2.5)), ?WORDS)
        end,
    text(Len - byte_size(W) - 1, [W | Acc]).

name() ->
    <<(pick({<<"Ana">>, <<"Ben">>, <<"Chen">>, <<"Dara">>, <<"Eli">>, <<"Fatima">>, <<"Gus">>, <<"Hiro">>, <<"Iris">>, <<"Jon">>}))/binary,
      " ", (pick({<<"Silva">>, <<"Meyer">>, <<"Wang">>, <<"Okafor">>, <<"Rossi">>, <<"Kumar">>, <<"Sato">>, <<"Novak">>}))/binary>>.

hex(N) -> << <<(element(1 + rand:uniform(16) - 1 + 0, {$0,$1,$2,$3,$4,$5,$6,$7,$8,$9,$a,$b,$c,$d,$e,$f}))>> || _ <- lists:seq(1, N) >>.

pick(T) -> element(rand:uniform(tuple_size(T)), T).

%% Sends every message of tuple Msgs in turn ({msg, self(), M}), at most
%% Window unacknowledged; returns the elapsed microseconds.
stream_list(R, Msgs, Window) ->
    R ! reset,
    N = tuple_size(Msgs),
    T0 = erlang:monotonic_time(microsecond),
    send_list(R, Msgs, N, Window, 0, 0),
    erlang:monotonic_time(microsecond) - T0.

send_list(_R, _Msgs, N, _W, _Sent, Acked) when Acked >= N ->
    ok;
send_list(R, Msgs, N, W, Sent, Acked) when Sent < N, Sent - Acked < W ->
    R ! {msg, self(), element(Sent + 1, Msgs)},
    send_list(R, Msgs, N, W, Sent + 1, Acked);
send_list(R, Msgs, N, W, Sent, _Acked) ->
    receive
        {ack, A} -> send_list(R, Msgs, N, W, Sent, A)
    after 60000 -> exit(stalled)
    end.

%% Writes each message as the distribution carries it (the external term
%% format of {msg, Pid, M}), each after a 4-byte length; returns the
%% total bytes.
dump(Msgs, File) ->
    Bins = [term_to_binary({msg, self(), M}) || M <- tuple_to_list(Msgs)],
    ok = file:write_file(File, [[<<(byte_size(B)):32>>, B] || B <- Bins]),
    lists:sum([byte_size(B) || B <- Bins]).
